//! A component importing `test:foreign/net`, which no Tollgate host offers: the gateway must
//! refuse it at load and name the import.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

wit_bindgen::generate!({
    inline: r#"
        package test:foreign;

        interface net {
            connect: func(host: string) -> bool;
        }

        world foreign {
            import net;
            export run: func() -> bool;
        }
    "#,
    world: "foreign",
});

struct Foreign;

impl Guest for Foreign {
    fn run() -> bool {
        test::foreign::net::connect("example.com")
    }
}

#[cfg(target_arch = "wasm32")]
export!(Foreign);
