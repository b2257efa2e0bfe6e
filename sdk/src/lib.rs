//! The Rust SDK for Tollgate policies (`tollgate:policy@0.2.0`): handshake policies (below)
//! and message policies ([`message`]).
//!
//! A policy is a WebAssembly component built for `wasm32-wasip2` against the
//! `handshake-policy` world in `wit/policy.wit`. With this crate the smallest useful policy is
//! a config type, a [`Policy`] impl and one [`export!`]:
//!
//! ```
//! use tollgate_sdk::{Capability, Decision, Policy, Request};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { header: String }
//!
//! struct RequireHeader;
//!
//! impl Policy for RequireHeader {
//!     type Config = Config;
//!     const CAPABILITIES: &'static [Capability] = &[Capability::ReadRequest, Capability::Reject];
//!     fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
//!         Ok(match request.header(&config.header) {
//!             Some(_) => Decision::proceed(),
//!             None => Decision::reject(401, format!("{} is required", config.header)),
//!         })
//!     }
//! }
//!
//! tollgate_sdk::export!(RequireHeader);
//!
//! // Natively the same code runs as plain Rust: this is how a policy is unit-tested.
//! let config = Config { header: "x-team".into() };
//! let request = tollgate_sdk::testing::request().build();
//! let decision = RequireHeader::on_handshake(&config, &request).unwrap();
//! assert_eq!(decision.status(), Some(401));
//! ```
//!
//! What the SDK does for it:
//! - **Declaration**: name and version come from the crate's Cargo metadata
//!   (`CARGO_PKG_NAME`, `CARGO_PKG_VERSION`); `export!(T, name = "...")` overrides the name.
//! - **Config**: at load, [`Policy::configure`] checks the attachment's config by parsing it
//!   into `Config` (and [`Policy::check`]); per instance, the prepared config is parsed once and
//!   every handshake that instance serves gets `&Config`. Nothing is re-sent or re-parsed per
//!   call, and pooled and fresh instances behave the same.
//! - **Request**: [`Request`] reads the handshake on demand; each read is one host call, so a
//!   policy pays only for what it reads.
//! - **Errors**: `Err(message)` from `on_handshake` means "could not decide": the gateway
//!   answers with the attachment's `failure_status` and logs the message; the client never
//!   sees it. Refusing on purpose is [`Decision::reject`].
//! - **Export**: [`export!`] emits the component exports only when building for wasm, so the
//!   same crate builds natively for its unit tests.
//!
//! Build with `cargo build --release --target wasm32-wasip2` and drop the `.wasm` file into the
//! gateway's `plugin_dir`. Natively, [`host`] answers host calls in-process (signature checks
//! by the gateway's own code, log lines captured) and [`testing`] builds requests.
//!
//! A message policy (world `message-policy`, called for every data message after the
//! handshake) is the same shape: a [`message::MessagePolicy`] impl and one
//! [`export_message_policy!`]; its types are in [`message`], and [`testing`] builds its
//! connections and messages.

use std::any::Any;
use std::cell::RefCell;

/// The generated bindings of `wit/policy.wit`. Policies use the types re-exported at the crate
/// root and [`host`]; these are public only for [`export!`]'s expansion.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handshake-policy",
        pub_export_macro: true,
        export_macro_name: "__export_handshake_policy",
        default_bindings_module: "tollgate_sdk::bindings",
        generate_all,
    });
}

/// The generated bindings of the `message-policy` world. The interfaces both worlds share
/// (`types`, `log`, `config`) are [`bindings`]' own, so [`Pair`] and [`host::log`] are one type
/// and one function for both kinds of policy. Policies use [`message`]; this is public only for
/// [`export_message_policy!`]'s expansion.
#[doc(hidden)]
pub mod message_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "message-policy",
        pub_export_macro: true,
        export_macro_name: "__export_message_policy",
        default_bindings_module: "tollgate_sdk::message_bindings",
        with: {
            "tollgate:policy/types@0.2.0": crate::bindings::tollgate::policy::types,
            "tollgate:policy/log@0.2.0": crate::bindings::tollgate::policy::log,
            "tollgate:policy/config@0.2.0": crate::bindings::tollgate::policy::config,
        },
        generate_all,
    });
}

pub mod message;

pub use bindings::tollgate::policy::handshake_types::{
    Capability, Decision, Declaration, HeaderChange, Proceed, QueryChange, Rejection,
};
pub use bindings::tollgate::policy::types::{Pair, TlsInfo};

#[doc(hidden)]
pub use serde_json as __serde_json;

/// A handshake policy. Implement it on a unit struct and pass that to [`export!`].
///
/// ```
/// use tollgate_sdk::{Capability, Decision, Policy, Proceed, Request};
///
/// #[derive(serde::Deserialize)]
/// struct Config { value: String }
///
/// struct Tag;
///
/// impl Policy for Tag {
///     type Config = Config;
///     const CAPABILITIES: &'static [Capability] = &[Capability::ModifyHeaders];
///     fn check(config: &Config) -> Result<(), String> {
///         if config.value.contains('\n') { return Err("no line breaks".into()) }
///         Ok(())
///     }
///     fn on_handshake(config: &Config, _request: &Request) -> Result<Decision, String> {
///         Ok(Proceed::new().set_header("x-tag", &config.value).into())
///     }
/// }
///
/// assert!(Tag::configure(r#"{"value": "a\nb"}"#).is_err());
/// assert!(Tag::configure(r#"{"colour": 1}"#).is_err());
/// assert!(Tag::configure(r#"{"value": "blue"}"#).is_ok());
/// ```
pub trait Policy {
    /// The attachment's config as the policy uses it: the manifest's `config` table (as JSON),
    /// or whatever [`Policy::configure`] prepared from it.
    ///
    /// ```
    /// // `config = { header = "x-team" }` in the manifest arrives as:
    /// #[derive(serde::Deserialize)]
    /// struct Config { header: String }
    /// let c: Config = serde_json::from_str(r#"{"header": "x-team"}"#).unwrap();
    /// assert_eq!(c.header, "x-team");
    /// ```
    type Config: serde::de::DeserializeOwned + 'static;

    /// What the policy does. The gateway refuses any request read, host call or decision that
    /// needs a capability not listed here.
    ///
    /// ```
    /// use tollgate_sdk::Capability;
    /// // Reads headers and may refuse: nothing else.
    /// const CAPABILITIES: &[Capability] = &[Capability::ReadRequest, Capability::Reject];
    /// assert!(!CAPABILITIES.contains(&Capability::ModifyHeaders));
    /// ```
    const CAPABILITIES: &'static [Capability];

    /// The declared capabilities; override only when they are computed.
    ///
    /// ```
    /// # use tollgate_sdk::{Capability, Decision, Policy, Request};
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = serde::de::IgnoredAny;
    /// #     const CAPABILITIES: &'static [Capability] = &[Capability::ReadRequest];
    /// #     fn on_handshake(_: &Self::Config, _: &Request) -> Result<Decision, String> { Ok(Decision::proceed()) }
    /// # }
    /// assert_eq!(P::capabilities(), vec![Capability::ReadRequest]);
    /// ```
    fn capabilities() -> Vec<Capability> {
        Self::CAPABILITIES.to_vec()
    }

    /// Checks a parsed config beyond what its type says (called at load, by the default
    /// [`Policy::configure`]); an error stops the gateway's start or reload.
    ///
    /// ```
    /// # use tollgate_sdk::{Capability, Decision, Policy, Request};
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = u32;
    /// #     const CAPABILITIES: &'static [Capability] = &[];
    /// #     fn on_handshake(_: &u32, _: &Request) -> Result<Decision, String> { Ok(Decision::proceed()) }
    /// # }
    /// assert_eq!(P::check(&7), Ok(())); // the default accepts what parses
    /// ```
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Runs once per attachment at load with the manifest's `config` table as JSON; returns
    /// the prepared config every instance parses into [`Policy::Config`]. The default parses
    /// and [`Policy::check`]s it, then passes the JSON on unchanged. Override it to do work
    /// once instead of per handshake (read granted files, decode keys) and return the result
    /// as JSON of `Config`.
    ///
    /// ```
    /// # use tollgate_sdk::{Capability, Decision, Policy, Request};
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = Vec<String>;
    /// #     const CAPABILITIES: &'static [Capability] = &[];
    /// #     fn on_handshake(_: &Vec<String>, _: &Request) -> Result<Decision, String> { Ok(Decision::proceed()) }
    /// # }
    /// assert_eq!(P::configure(r#"["a"]"#).as_deref(), Ok(r#"["a"]"#));
    /// assert!(P::configure(r#"{"a": 1}"#).unwrap_err().contains("config"));
    /// ```
    fn configure(config_json: &str) -> Result<String, String> {
        let config: Self::Config =
            serde_json::from_str(config_json).map_err(|e| format!("invalid config: {e}"))?;
        Self::check(&config)?;
        Ok(config_json.to_owned())
    }

    /// Decides one handshake. `Err`: the policy could not decide; the client gets the
    /// attachment's `failure_status` and the message goes to the gateway's log only.
    ///
    /// ```
    /// # use tollgate_sdk::{Capability, Decision, Policy, Request};
    /// struct Tenant;
    /// impl Policy for Tenant {
    ///     type Config = serde::de::IgnoredAny;
    ///     const CAPABILITIES: &'static [Capability] = &[Capability::UseContext, Capability::Reject];
    ///     fn on_handshake(_: &Self::Config, request: &Request) -> Result<Decision, String> {
    ///         Ok(match request.context("jwt.tenant") {
    ///             Some(_) => Decision::proceed(),
    ///             None => Decision::reject(403, "no tenant"),
    ///         })
    ///     }
    /// }
    /// let r = tollgate_sdk::testing::request().build();
    /// assert_eq!(Tenant::on_handshake(&serde::de::IgnoredAny, &r).unwrap().status(), Some(403));
    /// ```
    fn on_handshake(config: &Self::Config, request: &Request) -> Result<Decision, String>;
}

/// Exports a [`Policy`] as the component's `handshake` interface. Expands to nothing on
/// non-wasm targets, so the crate still builds (and tests) natively.
///
/// ```
/// # use tollgate_sdk::{Capability, Decision, Policy, Request};
/// struct Noop;
/// impl Policy for Noop {
///     type Config = serde_json::Value;
///     const CAPABILITIES: &'static [Capability] = &[];
///     fn on_handshake(_: &serde_json::Value, _: &Request) -> Result<Decision, String> {
///         Ok(Decision::proceed())
///     }
/// }
/// tollgate_sdk::export!(Noop);                       // name: the crate's package name
/// // tollgate_sdk::export!(Noop, name = "noop-2");   // or an explicit one
/// ```
#[macro_export]
macro_rules! export {
    ($policy:ty) => {
        $crate::export!($policy, name = env!("CARGO_PKG_NAME"));
    };
    ($policy:ty, name = $name:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __TollgateExport;
            impl $crate::bindings::exports::tollgate::policy::handshake::Guest for __TollgateExport {
                fn declare() -> $crate::Declaration {
                    $crate::Declaration {
                        name: ::std::string::String::from($name),
                        version: ::std::string::String::from(env!("CARGO_PKG_VERSION")),
                        capabilities: <$policy as $crate::Policy>::capabilities(),
                    }
                }
                fn configure(
                    config_json: ::std::string::String,
                ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                    <$policy as $crate::Policy>::configure(&config_json)
                }
                fn on_handshake(
                    request: &$crate::bindings::tollgate::policy::handshake_types::Request,
                ) -> ::std::result::Result<$crate::Decision, ::std::string::String> {
                    $crate::__on_handshake::<$policy>(request)
                }
            }
            $crate::bindings::__export_handshake_policy!(__TollgateExport with_types_in $crate::bindings);
        };
    };
}

thread_local! {
    /// This instance's parsed config. An instance serves one attachment for its whole life
    /// (the host guarantees it), so the first handshake (or message) parses and the rest reuse.
    static CONFIG: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// The body of the exported `on-handshake`: the instance's config (parsed on first use), the
/// request wrapped for on-demand reads, then the policy.
#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub fn __on_handshake<P: Policy>(
    request: &bindings::tollgate::policy::handshake_types::Request,
) -> Result<Decision, String> {
    with_config::<P::Config, _>(bindings::tollgate::policy::config::prepared, |config| {
        P::on_handshake(config, &Request { host: request })
    })
}

/// Runs `f` with the instance's config (a [`Policy::Config`] or a
/// [`message::MessagePolicy::Config`]: a component is one kind or the other), parsing
/// `prepared()` the first time.
#[cfg_attr(not(any(test, target_arch = "wasm32")), allow(dead_code))]
fn with_config<C: serde::de::DeserializeOwned + 'static, R>(
    prepared: impl FnOnce() -> String,
    f: impl FnOnce(&C) -> Result<R, String>,
) -> Result<R, String> {
    CONFIG.with(|cell| {
        if cell.borrow().is_none() {
            let parsed: C = serde_json::from_str(&prepared())
                .map_err(|e| format!("prepared config does not parse: {e}"))?;
            *cell.borrow_mut() = Some(Box::new(parsed));
        }
        let held = cell.borrow();
        match held.as_ref().and_then(|c| c.downcast_ref::<C>()) {
            Some(config) => f(config),
            None => Err("prepared config has another type than this policy's".into()),
        }
    })
}

impl Decision {
    /// Let the handshake go on unchanged.
    ///
    /// ```
    /// assert_eq!(tollgate_sdk::Decision::proceed().status(), None);
    /// ```
    pub fn proceed() -> Decision {
        Decision::Proceed(Proceed::new())
    }

    /// Refuse the handshake with `status` (400..599) and `message` as a plain-text body.
    ///
    /// ```
    /// let d = tollgate_sdk::Decision::reject(403, "not on the list");
    /// assert_eq!(d.status(), Some(403));
    /// ```
    pub fn reject(status: u16, message: impl Into<String>) -> Decision {
        Decision::Reject(Rejection::new(status, message))
    }

    /// The rejection's status; `None` when the handshake proceeds.
    ///
    /// ```
    /// use tollgate_sdk::{Decision, Proceed};
    /// assert_eq!(Decision::from(Proceed::new()).status(), None);
    /// ```
    pub fn status(&self) -> Option<u16> {
        match self {
            Decision::Reject(r) => Some(r.status),
            Decision::Proceed(_) => None,
        }
    }

    /// The proceed's changes; `None` when the handshake is rejected.
    ///
    /// ```
    /// use tollgate_sdk::{Decision, Proceed};
    /// let d: Decision = Proceed::new().context("tenant", "t1").into();
    /// assert_eq!(d.proceeding().unwrap().context[0].value, "t1");
    /// ```
    pub fn proceeding(&self) -> Option<&Proceed> {
        match self {
            Decision::Proceed(p) => Some(p),
            Decision::Reject(_) => None,
        }
    }
}

impl From<Proceed> for Decision {
    fn from(p: Proceed) -> Decision {
        Decision::Proceed(p)
    }
}

impl From<Rejection> for Decision {
    fn from(r: Rejection) -> Decision {
        Decision::Reject(r)
    }
}

impl Rejection {
    /// A rejection with a plain-text body.
    ///
    /// ```
    /// let r = tollgate_sdk::Rejection::new(401, "token expired").header("www-authenticate", "Bearer");
    /// assert_eq!(r.body, b"token expired");
    /// assert_eq!(r.headers.len(), 2); // content-type and www-authenticate
    /// ```
    pub fn new(status: u16, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            headers: vec![Pair::new("content-type", "text/plain; charset=utf-8")],
            body: message.into().into_bytes(),
        }
    }

    /// Adds a response header (framing and handshake headers are refused by the gateway).
    ///
    /// ```
    /// let r = tollgate_sdk::Rejection::new(429, "slow down").header("retry-after", "5");
    /// assert_eq!(r.headers[1].value, "5");
    /// ```
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Rejection {
        self.headers.push(Pair::new(name, value));
        self
    }
}

impl Proceed {
    /// Continue unchanged; add changes with the builder methods.
    ///
    /// ```
    /// let p = tollgate_sdk::Proceed::new();
    /// assert!(p.header_changes.is_empty() && p.close_at.is_none());
    /// ```
    pub fn new() -> Proceed {
        Proceed {
            header_changes: Vec::new(),
            query_changes: Vec::new(),
            response_headers: Vec::new(),
            context: Vec::new(),
            close_at: None,
            backend: None,
        }
    }

    /// Sets a backend request header, replacing any value (needs `modify-headers`).
    ///
    /// ```
    /// use tollgate_sdk::{HeaderChange, Proceed};
    /// let p = Proceed::new().set_header("x-user", "ann");
    /// assert!(matches!(&p.header_changes[0], HeaderChange::Set(h) if h.value == "ann"));
    /// ```
    pub fn set_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Proceed {
        self.header_changes
            .push(HeaderChange::Set(Pair::new(name, value)));
        self
    }

    /// Adds a value to a backend request header (needs `modify-headers`).
    ///
    /// ```
    /// use tollgate_sdk::{HeaderChange, Proceed};
    /// let p = Proceed::new().append_header("x-tag", "b");
    /// assert!(matches!(&p.header_changes[0], HeaderChange::Append(_)));
    /// ```
    pub fn append_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Proceed {
        self.header_changes
            .push(HeaderChange::Append(Pair::new(name, value)));
        self
    }

    /// Removes a backend request header (needs `modify-headers`).
    ///
    /// ```
    /// use tollgate_sdk::{HeaderChange, Proceed};
    /// let p = Proceed::new().remove_header("cookie");
    /// assert!(matches!(&p.header_changes[0], HeaderChange::Remove(n) if n == "cookie"));
    /// ```
    pub fn remove_header(mut self, name: impl Into<String>) -> Proceed {
        self.header_changes.push(HeaderChange::Remove(name.into()));
        self
    }

    /// Sets a backend query parameter (needs `modify-query`).
    ///
    /// ```
    /// use tollgate_sdk::{Proceed, QueryChange};
    /// let p = Proceed::new().set_query("region", "eu");
    /// assert!(matches!(&p.query_changes[0], QueryChange::Set(q) if q.value == "eu"));
    /// ```
    pub fn set_query(mut self, name: impl Into<String>, value: impl Into<String>) -> Proceed {
        self.query_changes
            .push(QueryChange::Set(Pair::new(name, value)));
        self
    }

    /// Removes a backend query parameter (needs `modify-query`).
    ///
    /// ```
    /// use tollgate_sdk::{Proceed, QueryChange};
    /// let p = Proceed::new().remove_query("debug");
    /// assert!(matches!(&p.query_changes[0], QueryChange::Remove(n) if n == "debug"));
    /// ```
    pub fn remove_query(mut self, name: impl Into<String>) -> Proceed {
        self.query_changes.push(QueryChange::Remove(name.into()));
        self
    }

    /// Adds a header to the client's 101 (needs `modify-response-headers`).
    ///
    /// ```
    /// let p = tollgate_sdk::Proceed::new().response_header("x-region", "eu");
    /// assert_eq!(p.response_headers[0].name, "x-region");
    /// ```
    pub fn response_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Proceed {
        self.response_headers.push(Pair::new(name, value));
        self
    }

    /// Sets a context value later policies can read (needs `use-context`).
    ///
    /// ```
    /// let p = tollgate_sdk::Proceed::new().context("jwt.sub", "ann");
    /// assert_eq!(p.context[0].name, "jwt.sub");
    /// ```
    pub fn context(mut self, name: impl Into<String>, value: impl Into<String>) -> Proceed {
        self.context.push(Pair::new(name, value));
        self
    }

    /// Closes the connection at `unix_seconds` (1008 to the client, 1001 to the backend), e.g.
    /// when the token expires (needs `limit-lifetime`). The earliest deadline of a chain wins.
    ///
    /// ```
    /// let p = tollgate_sdk::Proceed::new().close_at(1_700_000_000);
    /// assert_eq!(p.close_at, Some(1_700_000_000));
    /// ```
    pub fn close_at(mut self, unix_seconds: u64) -> Proceed {
        self.close_at = Some(unix_seconds);
        self
    }
}

impl Proceed {
    /// Sends the handshake to the API's named backend `name` (the manifest's `backends`) instead
    /// of its `backend` (needs `select-backend`). A name the API does not list fails the
    /// handshake; the last policy that picks one wins.
    ///
    /// ```
    /// let p = tollgate_sdk::Proceed::new().backend("eu");
    /// assert_eq!(p.backend.as_deref(), Some("eu"));
    /// ```
    pub fn backend(mut self, name: impl Into<String>) -> Proceed {
        self.backend = Some(name.into());
        self
    }
}

impl Default for Proceed {
    fn default() -> Self {
        Proceed::new()
    }
}

impl Pair {
    /// A name/value pair.
    ///
    /// ```
    /// let p = tollgate_sdk::Pair::new("x-user", "ann");
    /// assert_eq!((p.name.as_str(), p.value.as_str()), ("x-user", "ann"));
    /// ```
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Pair {
        Pair {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// The client's opening handshake, read on demand: in a component every method is one host
/// call that copies only what it returns (natively, built with [`testing::request`]). Reads of
/// the request need `read-request`, reads of the context `use-context`.
///
/// ```
/// let r = tollgate_sdk::testing::request()
///     .header("Authorization", "Bearer t0k")
///     .query("room", "7")
///     .context("jwt.sub", "ann")
///     .build();
/// assert_eq!(r.header("authorization").as_deref(), Some("Bearer t0k"));
/// assert_eq!(r.query("room").as_deref(), Some("7"));
/// assert_eq!(r.context("jwt.sub").as_deref(), Some("ann"));
/// ```
pub struct Request<'a> {
    #[cfg(target_arch = "wasm32")]
    host: &'a bindings::tollgate::policy::handshake_types::Request,
    #[cfg(not(target_arch = "wasm32"))]
    data: testing::RequestData,
    #[cfg(not(target_arch = "wasm32"))]
    _borrow: std::marker::PhantomData<&'a ()>,
}

/// One method per WIT read, forwarded to the host in a component and answered from the test
/// data natively.
macro_rules! reads {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => |$d:ident| $native:expr; )*) => {
        impl Request<'_> {
            $(
                $(#[$doc])*
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    #[cfg(target_arch = "wasm32")]
                    { self.host.$name($($arg),*) }
                    #[cfg(not(target_arch = "wasm32"))]
                    { let $d = &self.data; $native }
                }
            )*
        }
    };
}

#[cfg(not(target_arch = "wasm32"))]
fn first(pairs: &[Pair], name: &str, fold_case: bool) -> Option<String> {
    pairs
        .iter()
        .find(|p| {
            if fold_case {
                p.name.eq_ignore_ascii_case(name)
            } else {
                p.name == name
            }
        })
        .map(|p| p.value.clone())
}

reads! {
    /// The method ("GET").
    ///
    /// ```
    /// assert_eq!(tollgate_sdk::testing::request().build().method(), "GET");
    /// ```
    fn method() -> String => |d| d.method.clone();
    /// The normalised path, without the query.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().path("/chat/7").build();
    /// assert_eq!(r.path(), "/chat/7");
    /// ```
    fn path() -> String => |d| d.path.clone();
    /// The first value of header `name` (case-insensitive).
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().header("X-A", "1").build();
    /// assert_eq!(r.header("x-a").as_deref(), Some("1"));
    /// assert_eq!(r.header("X-A").as_deref(), Some("1"));
    /// ```
    fn header(name: &str) -> Option<String> => |d| first(&d.headers, name, true);
    /// Every value of header `name`, in order.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().header("x-a", "1").header("x-a", "2").build();
    /// assert_eq!(r.header_values("x-a"), ["1", "2"]);
    /// ```
    fn header_values(name: &str) -> Vec<String> => |d| d.headers.iter()
        .filter(|p| p.name.eq_ignore_ascii_case(name)).map(|p| p.value.clone()).collect();
    /// Every header, names lower-case.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().header("X-A", "1").build();
    /// assert_eq!(r.headers()[0].name, "x-a");
    /// ```
    fn headers() -> Vec<Pair> => |d| d.headers.clone();
    /// The first value of query parameter `name` (case-sensitive), percent-decoded.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().query("a", "1").build();
    /// assert_eq!(r.query("a").as_deref(), Some("1"));
    /// assert_eq!(r.query("A"), None);
    /// ```
    fn query(name: &str) -> Option<String> => |d| first(&d.query, name, false);
    /// Every query parameter, in order.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().query("a", "1").build();
    /// assert_eq!(r.query_pairs().len(), 1);
    /// ```
    fn query_pairs() -> Vec<Pair> => |d| d.query.clone();
    /// "ip:port" of the client.
    ///
    /// ```
    /// assert!(tollgate_sdk::testing::request().build().client_address().starts_with("127.0.0.1:"));
    /// ```
    fn client_address() -> String => |d| d.client_address.clone();
    /// The client's IP as a filter should judge it (the peer's, or past the gateway's trusted
    /// proxies in `X-Forwarded-For`); `None` when the gateway could not tell (refuse then).
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().client_ip("2001:db8::5").build();
    /// assert_eq!(r.client_ip().as_deref(), Some("2001:db8::5"));
    /// ```
    fn client_ip() -> Option<String> => |d| d.client_ip.clone();
    /// TLS facts of a wss client connection.
    ///
    /// ```
    /// assert!(tollgate_sdk::testing::request().build().tls().is_none());
    /// ```
    fn tls() -> Option<TlsInfo> => |d| d.tls.clone();
    /// The API's name.
    ///
    /// ```
    /// assert_eq!(tollgate_sdk::testing::request().api("chat").build().api(), "chat");
    /// ```
    fn api() -> String => |d| d.api.clone();
    /// The product the handshake came in through.
    ///
    /// ```
    /// assert_eq!(tollgate_sdk::testing::request().product("gold").build().product().as_deref(), Some("gold"));
    /// ```
    fn product() -> Option<String> => |d| d.product.clone();
    /// A context value set by the gateway or an earlier policy.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().context("jwt.sub", "ann").build();
    /// assert_eq!(r.context("jwt.sub").as_deref(), Some("ann"));
    /// ```
    fn context(name: &str) -> Option<String> => |d| first(&d.context, name, false);
    /// Every context value, in the order they were set.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().context("a", "1").build();
    /// assert_eq!(r.context_values()[0].value, "1");
    /// ```
    fn context_values() -> Vec<Pair> => |d| d.context.clone();
    /// When the handshake arrived, in seconds since the Unix epoch.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().received_at(1_700_000_000).build();
    /// assert_eq!(r.received_at(), 1_700_000_000);
    /// ```
    fn received_at() -> u64 => |d| d.received_at;
}

impl Request<'_> {
    /// `template` with each `{key}` replaced by the context value `key` (empty when absent), as
    /// set-header's `"{jwt.sub}"` and set-backend-service's `"{jwt.region}"` use it (needs
    /// `use-context`). An unclosed `{` is kept as written.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().context("jwt.sub", "ann").build();
    /// assert_eq!(r.expand("user-{jwt.sub}/{missing}{"), "user-ann/{");
    /// ```
    pub fn expand(&self, template: &str) -> String {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            match rest[open..].find('}') {
                Some(close) => {
                    let key = &rest[open + 1..open + close];
                    out.push_str(self.context(key).as_deref().unwrap_or(""));
                    rest = &rest[open + close + 1..];
                }
                None => {
                    out.push_str(&rest[open..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// Calls into the gateway. In a component these are the WIT imports; natively (unit tests)
/// they are served in-process: [`host::verify`] by the gateway's own verification code and
/// [`host::log`] into a buffer [`testing::take_logs`] returns. A message policy has
/// [`host::log`] only (its world imports nothing else; the gateway refuses one that does).
pub mod host {
    pub use crate::bindings::tollgate::policy::log::Level;
    pub use crate::bindings::tollgate::policy::signatures::{Algorithm, Key, RsaPublicKey};

    /// Writes a line to the gateway's log, tagged with the plugin's name.
    ///
    /// ```
    /// use tollgate_sdk::host::{log, Level};
    /// log(Level::Info, "token expired");
    /// // In a native test the line is captured instead:
    /// let logged = tollgate_sdk::testing::take_logs();
    /// assert!(matches!(logged[0].0, Level::Info));
    /// assert_eq!(logged[0].1, "token expired");
    /// ```
    pub fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        crate::bindings::tollgate::policy::log::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::LOGS.with(|l| l.borrow_mut().push((level, message.to_owned())));
    }

    /// Verifies a signature natively in the host (needs `verify-signatures`). `Ok(false)`: it
    /// does not verify; `Err`: the key cannot be used with `alg` (a key is only used with its
    /// own family).
    ///
    /// ```
    /// use tollgate_sdk::host::{verify, Algorithm, Key};
    /// let secret = Key::Secret(b"k".to_vec());
    /// // A tag that was not made with this secret does not verify...
    /// assert_eq!(verify(Algorithm::Hs256, &secret, b"msg", &[0u8; 32]), Ok(false));
    /// // ...and a secret is never used as an RSA key.
    /// assert!(verify(Algorithm::Rs256, &secret, b"msg", &[0u8; 256]).is_err());
    /// ```
    pub fn verify(
        alg: Algorithm,
        key: &Key,
        message: &[u8],
        signature: &[u8],
    ) -> Result<bool, String> {
        #[cfg(target_arch = "wasm32")]
        {
            crate::bindings::tollgate::policy::signatures::verify(alg, key, message, signature)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            native_verify(alg, key, message, signature)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn native_verify(
        alg: Algorithm,
        key: &Key,
        message: &[u8],
        signature: &[u8],
    ) -> Result<bool, String> {
        use tollgate_verify::{Algorithm as A, Key as K};
        // The generated enum follows the WIT's order, as `WIT_ORDER` does.
        let Some(alg) = A::from_wit_position(alg as usize) else {
            return Err("unknown algorithm".into());
        };
        let key = match key {
            Key::Spki(d) => K::Spki(d.clone()),
            Key::Rsa(r) => K::Rsa {
                n: r.n.clone(),
                e: r.e.clone(),
            },
            Key::Raw(r) => K::Raw(r.clone()),
            Key::Secret(s) => K::Secret(s.clone()),
        };
        tollgate_verify::verify(alg, &key, message, signature)
    }

    pub use crate::bindings::tollgate::policy::key_sets::{
        KeySet, Options as KeySetOptions, Source as KeySetSource, Verification,
    };

    /// Registers a key set the gateway fetches over HTTPS and keeps fresh (a JWKS, or an OpenID
    /// Connect discovery document that names one), for [`verify_with_key_set`]. Call it from
    /// [`crate::Policy::configure`] (needs `fetch-keys`) with a URL taken from the attachment's
    /// config (the gateway fetches nothing else; at most 8 calls per attachment), and keep the
    /// handle in the prepared config: the gateway has fetched the keys by the time it returns,
    /// or says why not.
    /// Natively, the documents are the ones [`crate::testing::serve_key_set`] registered.
    ///
    /// ```
    /// use tollgate_sdk::host::{register_key_set, KeySetOptions, KeySetSource};
    /// let url = "https://idp.example/jwks";
    /// tollgate_sdk::testing::serve_key_set(url, r#"{"keys": [{"kty": "OKP", "crv": "Ed25519",
    ///     "kid": "k1", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#);
    /// let options = KeySetOptions { refresh_seconds: 0, min_refresh_seconds: 0, ca_pem: None };
    /// assert!(register_key_set(&KeySetSource::Jwks(url.into()), &options).is_ok());
    /// let unknown = KeySetSource::Jwks("https://elsewhere.example/jwks".into());
    /// assert!(register_key_set(&unknown, &options).is_err());
    /// ```
    pub fn register_key_set(
        source: &KeySetSource,
        options: &KeySetOptions,
    ) -> Result<KeySet, String> {
        #[cfg(target_arch = "wasm32")]
        {
            crate::bindings::tollgate::policy::key_sets::register(source, options)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = options;
            crate::testing::register_key_set(source)
        }
    }

    /// Verifies `signature` over `message` with the keys of `set` that fit `alg` and `kid`
    /// (needs `verify-signatures`): `Valid`, `Invalid` (keys fit, none verifies) or `NoKey`
    /// (no key fits, even after the refetch an unknown `kid` triggers in the gateway).
    ///
    /// ```
    /// use tollgate_sdk::host::*;
    /// let url = "https://idp.example/keys";
    /// tollgate_sdk::testing::serve_key_set(url, r#"{"keys": [{"kty": "OKP", "crv": "Ed25519",
    ///     "kid": "k1", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#);
    /// let options = KeySetOptions { refresh_seconds: 0, min_refresh_seconds: 0, ca_pem: None };
    /// let set = register_key_set(&KeySetSource::Jwks(url.into()), &options).unwrap();
    /// let v = verify_with_key_set(set, Algorithm::EdDsa, Some("k1"), b"m", &[0; 64]);
    /// assert_eq!(v, Ok(Verification::Invalid));
    /// let v = verify_with_key_set(set, Algorithm::EdDsa, Some("k2"), b"m", &[0; 64]);
    /// assert_eq!(v, Ok(Verification::NoKey));
    /// ```
    pub fn verify_with_key_set(
        set: KeySet,
        alg: Algorithm,
        kid: Option<&str>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<Verification, String> {
        #[cfg(target_arch = "wasm32")]
        {
            crate::bindings::tollgate::policy::key_sets::verify(set, alg, kid, message, signature)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::testing::verify_with_key_set(set, alg, kid, message, signature)
        }
    }
}

/// Rate counters kept by the gateway (the `counters` interface): "at most `limit` in any
/// window", in the gateway or across the fleet (`[cluster]`).
pub mod counters {
    pub use crate::bindings::tollgate::policy::counters::{Counted, Rate};

    /// Counts `amount` under `key` if it fits under `rate` (needs `use-counters`; only in
    /// `on_handshake`, at most 8 calls per handshake). A refused increment counts nothing and
    /// says when the amount fits (`retry_after_ms`). Keys are the plugin's own; `Err` is worded
    /// for the operator (a bad rate, or the fleet's store unavailable with
    /// `on_store_failure = "closed"`): refuse the handshake then.
    /// Natively, counts on this thread, on a clock [`crate::testing::advance_counters`] moves.
    ///
    /// ```
    /// use tollgate_sdk::counters::{increment, Rate};
    /// let rate = Rate { limit: 2, window_seconds: 10 };
    /// assert!(increment("ann", rate, 1).unwrap().allowed);
    /// assert!(increment("ann", rate, 1).unwrap().allowed);
    /// let refused = increment("ann", rate, 1).unwrap();
    /// assert!(!refused.allowed);
    /// assert_eq!(refused.retry_after_ms, 10_000);
    /// // Another key counts apart.
    /// assert!(increment("bob", rate, 1).unwrap().allowed);
    /// tollgate_sdk::testing::advance_counters(10_000);
    /// assert!(increment("ann", rate, 1).unwrap().allowed);
    /// ```
    pub fn increment(key: &str, rate: Rate, amount: u64) -> Result<Counted, String> {
        #[cfg(target_arch = "wasm32")]
        {
            crate::bindings::tollgate::policy::counters::increment(key, rate, amount)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            crate::testing::increment_counter(key, rate, amount)
        }
    }
}

/// Unit-testing a policy with plain `cargo test`, no gateway: build requests (for a message
/// policy, connections and messages), read what the policy logged, run a policy's config
/// through load and a handshake ([`testing::handshake`]) or a message ([`testing::on_message`]).
///
/// ```
/// use tollgate_sdk::testing::request;
/// let r = request().header("authorization", "Bearer x").query("room", "1").build();
/// assert_eq!(r.header("Authorization").as_deref(), Some("Bearer x"));
/// assert_eq!(r.query("room").as_deref(), Some("1"));
/// ```
pub mod testing {
    use crate::{Pair, TlsInfo};

    #[cfg(not(target_arch = "wasm32"))]
    thread_local! {
        pub(crate) static LOGS: std::cell::RefCell<Vec<(crate::host::Level, String)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    #[cfg(not(target_arch = "wasm32"))]
    thread_local! {
        /// Documents `serve_key_set` registered, by URL, and the URLs registered as key sets
        /// (a handle is an index).
        static KEY_SET_DOCS: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
        static KEY_SETS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    #[cfg(not(target_arch = "wasm32"))]
    use std::cell::RefCell;

    /// Natively, what [`crate::host::register_key_set`] finds at `url` (a JWKS document, for
    /// either kind of source): serving it again with other keys is a key rotation, seen by the
    /// next verification. For this thread only.
    ///
    /// ```
    /// tollgate_sdk::testing::serve_key_set("https://idp.example/jwks", r#"{"keys": []}"#);
    /// ```
    #[cfg(not(target_arch = "wasm32"))]
    pub fn serve_key_set(url: &str, jwks: &str) {
        KEY_SET_DOCS.with(|d| {
            let mut d = d.borrow_mut();
            d.retain(|(u, _)| u != url);
            d.push((url.to_owned(), jwks.to_owned()));
        });
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn key_set_doc(url: &str) -> Option<String> {
        KEY_SET_DOCS.with(|d| {
            d.borrow()
                .iter()
                .find(|(u, _)| u == url)
                .map(|(_, j)| j.clone())
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn register_key_set(
        source: &crate::host::KeySetSource,
    ) -> Result<crate::host::KeySet, String> {
        use crate::host::KeySetSource as S;
        let (S::Jwks(url) | S::OpenidConfiguration(url)) = source;
        let doc = key_set_doc(url).ok_or_else(|| {
            format!("fetching key set {url}: nothing served there (testing::serve_key_set)")
        })?;
        tollgate_verify::jwks::parse(doc.as_bytes()).map_err(|e| format!("{url}: {e}"))?;
        KEY_SETS.with(|s| {
            let mut s = s.borrow_mut();
            s.push(url.clone());
            Ok((s.len() - 1) as crate::host::KeySet)
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn verify_with_key_set(
        set: crate::host::KeySet,
        alg: crate::host::Algorithm,
        kid: Option<&str>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<crate::host::Verification, String> {
        use crate::host::Verification as V;
        let url = KEY_SETS
            .with(|s| s.borrow().get(set as usize).cloned())
            .ok_or_else(|| format!("no key set {set}"))?;
        let doc = key_set_doc(&url).ok_or_else(|| format!("no key set at {url}"))?;
        let keys =
            tollgate_verify::jwks::parse(doc.as_bytes()).map_err(|e| format!("{url}: {e}"))?;
        let alg = tollgate_verify::Algorithm::from_wit_position(alg as usize)
            .ok_or("unknown algorithm")?;
        let mut any = false;
        for k in keys.keys.iter().filter(|k| k.fits(alg, kid)).take(4) {
            any = true;
            if tollgate_verify::verify(alg, &k.key, message, signature)? {
                return Ok(V::Valid);
            }
        }
        Ok(if any { V::Invalid } else { V::NoKey })
    }

    #[cfg(not(target_arch = "wasm32"))]
    thread_local! {
        /// Native counters: units counted per key and window, as (time, amount), on a clock of
        /// this thread's own (milliseconds).
        #[allow(clippy::type_complexity)]
        static COUNTERS: RefCell<std::collections::HashMap<(String, u32), Vec<(u64, u64)>>> =
            RefCell::new(std::collections::HashMap::new());
        static COUNTER_CLOCK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// Moves the clock native counters ([`crate::counters::increment`]) judge by, on this
    /// thread. Natively a unit counts for exactly its window (the gateway keeps it up to a
    /// 60th of the window longer).
    ///
    /// ```
    /// tollgate_sdk::testing::advance_counters(1_000);
    /// ```
    #[cfg(not(target_arch = "wasm32"))]
    pub fn advance_counters(ms: u64) {
        COUNTER_CLOCK.with(|c| c.set(c.get().saturating_add(ms)));
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn increment_counter(
        key: &str,
        rate: crate::counters::Rate,
        amount: u64,
    ) -> Result<crate::counters::Counted, String> {
        if rate.limit == 0 || rate.window_seconds == 0 {
            return Err("a rate needs a limit and a window of at least 1".into());
        }
        if amount > rate.limit {
            return Err(format!(
                "an amount of {amount} can never fit under a limit of {}",
                rate.limit
            ));
        }
        let now = COUNTER_CLOCK.with(|c| c.get());
        let window = u64::from(rate.window_seconds) * 1000;
        COUNTERS.with(|c| {
            let mut c = c.borrow_mut();
            let units = c.entry((key.to_owned(), rate.window_seconds)).or_default();
            units.retain(|(t, _)| t + window > now);
            let total: u64 = units.iter().map(|(_, n)| n).sum();
            let reset = |u: &Vec<(u64, u64)>| u.last().map_or(0, |(t, _)| t + window - now);
            if total + amount <= rate.limit {
                if amount > 0 {
                    units.push((now, amount));
                }
                return Ok(crate::counters::Counted {
                    allowed: true,
                    count: total + amount,
                    retry_after_ms: 0,
                    reset_after_ms: reset(units),
                });
            }
            let mut need = total + amount - rate.limit;
            let mut retry = 0;
            for (t, n) in units.iter() {
                need = need.saturating_sub(*n);
                if need == 0 {
                    retry = t + window - now;
                    break;
                }
            }
            Ok(crate::counters::Counted {
                allowed: false,
                count: total,
                retry_after_ms: retry,
                reset_after_ms: reset(units),
            })
        })
    }

    /// Lines logged through [`crate::host::log`] on this thread since the last call.
    ///
    /// ```
    /// tollgate_sdk::host::log(tollgate_sdk::host::Level::Warn, "hi");
    /// assert_eq!(tollgate_sdk::testing::take_logs()[0].1, "hi");
    /// ```
    #[cfg(not(target_arch = "wasm32"))]
    pub fn take_logs() -> Vec<(crate::host::Level, String)> {
        LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }

    /// Runs `config_json` through the policy's load-time [`crate::Policy::configure`], then one
    /// handshake as an instance would (the prepared config parsed into `Config`).
    ///
    /// ```
    /// # use tollgate_sdk::{Capability, Decision, Policy, Request};
    /// # struct P;
    /// # impl Policy for P {
    /// #     type Config = String;
    /// #     const CAPABILITIES: &'static [Capability] = &[Capability::Reject];
    /// #     fn on_handshake(c: &String, _: &Request) -> Result<Decision, String> { Ok(Decision::reject(403, c.clone())) }
    /// # }
    /// let d = tollgate_sdk::testing::handshake::<P>(r#""go away""#, &tollgate_sdk::testing::request().build());
    /// assert_eq!(d.unwrap().status(), Some(403));
    /// ```
    #[cfg(not(target_arch = "wasm32"))]
    pub fn handshake<P: crate::Policy>(
        config_json: &str,
        request: &crate::Request,
    ) -> Result<crate::Decision, String> {
        let prepared = P::configure(config_json)?;
        let config: P::Config = serde_json::from_str(&prepared)
            .map_err(|e| format!("prepared config does not parse: {e}"))?;
        P::on_handshake(&config, request)
    }

    /// Runs `config_json` through the message policy's load-time
    /// [`crate::message::MessagePolicy::configure`], then one message as the gateway calls and
    /// judges it, so a test sees what the gateway would do: the connection's context reaches
    /// the policy only if it declares `use-context`, and a decision the gateway refuses (one
    /// that needs an undeclared capability, a close code or reason a close frame may not
    /// carry, a text message replaced by bytes that are not UTF-8) is an `Err` naming why, as
    /// the gateway would then close the connection 1011. (The API's
    /// `max_inspected_message_size` is not known here, so a replacement's size is not judged.)
    ///
    /// ```
    /// use tollgate_sdk::message::*;
    /// use tollgate_sdk::testing::{connection, on_message, text};
    /// use serde::de::IgnoredAny;
    /// struct Quiet;
    /// impl MessagePolicy for Quiet {
    ///     type Config = IgnoredAny; // the manifest's config is always a table: `{}` if none
    ///     const CAPABILITIES: &'static [Capability] = &[Capability::ReplaceMessages];
    ///     fn on_message(_: &IgnoredAny, c: &Connection, _: Message) -> Result<MessageDecision, String> {
    ///         Ok(match c.context("jwt.sub") {
    ///             Some(_) => MessageDecision::Drop, // never: Quiet does not declare use-context
    ///             None => MessageDecision::replace_text("shh"),
    ///         })
    ///     }
    /// }
    /// let c = connection().context("jwt.sub", "ann").build();
    /// let d = on_message::<Quiet>("{}", &c, text("HELLO")).unwrap();
    /// assert_eq!(d.replacement(), Some(&b"shh"[..]));
    /// ```
    pub fn on_message<P: crate::message::MessagePolicy>(
        config_json: &str,
        connection: &crate::message::Connection,
        message: crate::message::Message,
    ) -> Result<crate::message::MessageDecision, String> {
        use crate::message::{Capability, Connection, Kind, MessageDecision};
        let prepared = P::configure(config_json)?;
        let config: P::Config = serde_json::from_str(&prepared)
            .map_err(|e| format!("prepared config does not parse: {e}"))?;
        let declared = P::capabilities();
        let bare;
        let seen = if declared.contains(&Capability::UseContext) {
            connection
        } else {
            bare = Connection {
                context: Vec::new(),
                ..connection.clone()
            };
            &bare
        };
        let text = message.kind == Kind::Text;
        let decision = P::on_message(&config, seen, message)?;
        let need = |c: Capability, name: &str, action: &str| {
            if declared.contains(&c) {
                Ok(())
            } else {
                Err(format!(
                    "{action} without declaring the capability `{name}`"
                ))
            }
        };
        match &decision {
            MessageDecision::Forward => {}
            MessageDecision::Replace(p) => {
                need(
                    Capability::ReplaceMessages,
                    "replace-messages",
                    "replaced a message",
                )?;
                if text && std::str::from_utf8(p).is_err() {
                    return Err("replaced a text message with bytes that are not UTF-8".into());
                }
            }
            MessageDecision::Drop => {
                need(
                    Capability::DropMessages,
                    "drop-messages",
                    "dropped a message",
                )?;
            }
            MessageDecision::Close(c) => {
                need(
                    Capability::CloseConnections,
                    "close-connections",
                    "closed a connection",
                )?;
                if !matches!(
                    c.code,
                    1000 | 1001 | 1003 | 1007 | 1008 | 1009 | 1011 | 3000..=4999
                ) {
                    return Err(format!(
                        "closed a connection with code {}, which a gateway may not send \
                         (1000, 1001, 1003, 1007-1009, 1011, 3000-4999)",
                        c.code
                    ));
                }
                if c.reason.len() > 123 {
                    return Err(format!(
                        "closed a connection with a reason of {} bytes (at most 123)",
                        c.reason.len()
                    ));
                }
            }
        }
        Ok(decision)
    }

    /// A connection of API `test` (number 1, no product, subscription or context), as the
    /// gateway hands it to a message policy; see [`ConnectionBuilder`] to change it.
    ///
    /// ```
    /// let c = tollgate_sdk::testing::connection().api("chat").build();
    /// assert_eq!((c.id, c.api.as_str(), c.product), (1, "chat", None));
    /// ```
    pub fn connection() -> ConnectionBuilder {
        ConnectionBuilder(crate::message::Connection {
            id: 1,
            api: "test".into(),
            product: None,
            subscription: None,
            context: Vec::new(),
        })
    }

    /// Builds a test [`crate::message::Connection`] step by step; see [`connection`].
    ///
    /// ```
    /// let c = tollgate_sdk::testing::connection().product("gold").subscription("alice").build();
    /// assert_eq!(c.subscription.as_deref(), Some("alice"));
    /// ```
    pub struct ConnectionBuilder(crate::message::Connection);

    impl ConnectionBuilder {
        /// Sets the gateway's number for the connection.
        ///
        /// ```
        /// assert_eq!(tollgate_sdk::testing::connection().id(42).build().id, 42);
        /// ```
        pub fn id(mut self, id: u64) -> Self {
            self.0.id = id;
            self
        }
        /// Sets the API name.
        ///
        /// ```
        /// assert_eq!(tollgate_sdk::testing::connection().api("chat").build().api, "chat");
        /// ```
        pub fn api(mut self, api: &str) -> Self {
            self.0.api = api.into();
            self
        }
        /// Sets the product the handshake came in through.
        ///
        /// ```
        /// let c = tollgate_sdk::testing::connection().product("gold").build();
        /// assert_eq!(c.product.as_deref(), Some("gold"));
        /// ```
        pub fn product(mut self, product: &str) -> Self {
            self.0.product = Some(product.into());
            self
        }
        /// Sets the subscription whose key the client sent.
        ///
        /// ```
        /// let c = tollgate_sdk::testing::connection().subscription("alice").build();
        /// assert_eq!(c.subscription.as_deref(), Some("alice"));
        /// ```
        pub fn subscription(mut self, subscription: &str) -> Self {
            self.0.subscription = Some(subscription.into());
            self
        }
        /// Adds a context value, as the onHandshake chain would leave it (the gateway sends
        /// them only to a policy that declares `use-context`; [`on_message`] does the same).
        ///
        /// ```
        /// let c = tollgate_sdk::testing::connection().context("jwt.sub", "ann").build();
        /// assert_eq!(c.context("jwt.sub"), Some("ann"));
        /// ```
        pub fn context(mut self, key: &str, value: &str) -> Self {
            self.0.context.push(Pair::new(key, value));
            self
        }
        /// The connection.
        ///
        /// ```
        /// assert_eq!(tollgate_sdk::testing::connection().build().api, "test");
        /// ```
        pub fn build(self) -> crate::message::Connection {
            self.0
        }
    }

    /// A text message from the client. For one from the backend, update its direction:
    /// `Message { direction: Direction::Backend, ..text("hi") }`.
    ///
    /// ```
    /// use tollgate_sdk::message::{Direction, Message};
    /// use tollgate_sdk::testing::text;
    /// let m = Message { direction: Direction::Backend, ..text("hi") };
    /// assert_eq!((m.direction, m.text()), (Direction::Backend, Some("hi")));
    /// ```
    pub fn text(text: &str) -> crate::message::Message {
        crate::message::Message {
            direction: crate::message::Direction::Client,
            kind: crate::message::Kind::Text,
            payload: text.as_bytes().to_vec(),
        }
    }

    /// A binary message from the client (see [`text`] for one from the backend).
    ///
    /// ```
    /// use tollgate_sdk::message::Kind;
    /// let m = tollgate_sdk::testing::binary([0, 1, 255]);
    /// assert_eq!((m.kind, m.payload.as_slice()), (Kind::Binary, &[0, 1, 255][..]));
    /// ```
    pub fn binary(payload: impl Into<Vec<u8>>) -> crate::message::Message {
        crate::message::Message {
            direction: crate::message::Direction::Client,
            kind: crate::message::Kind::Binary,
            payload: payload.into(),
        }
    }

    /// The test request's data, what [`RequestBuilder`] fills.
    ///
    /// ```
    /// let data = tollgate_sdk::testing::RequestData {
    ///     method: "GET".into(), path: "/".into(), query: vec![], headers: vec![],
    ///     client_address: "127.0.0.1:1".into(), client_ip: None, tls: None, api: "a".into(),
    ///     product: None, context: vec![], received_at: 0,
    /// };
    /// assert_eq!(data.api, "a");
    /// ```
    #[derive(Clone)]
    pub struct RequestData {
        pub method: String,
        pub path: String,
        pub query: Vec<Pair>,
        pub headers: Vec<Pair>,
        pub client_address: String,
        pub client_ip: Option<String>,
        pub tls: Option<TlsInfo>,
        pub api: String,
        pub product: Option<String>,
        pub context: Vec<Pair>,
        pub received_at: u64,
    }

    /// A `GET /` handshake of API `test`, received now, with no headers.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().path("/chat/7").build();
    /// assert_eq!(r.path(), "/chat/7");
    /// ```
    pub fn request() -> RequestBuilder {
        RequestBuilder(RequestData {
            method: "GET".into(),
            path: "/".into(),
            query: Vec::new(),
            headers: Vec::new(),
            client_address: "127.0.0.1:50000".into(),
            client_ip: Some("127.0.0.1".into()),
            tls: None,
            api: "test".into(),
            product: None,
            context: Vec::new(),
            received_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }

    /// Builds a test [`crate::Request`] step by step; see [`request`].
    pub struct RequestBuilder(RequestData);

    impl RequestBuilder {
        /// Adds a header (the name is lower-cased, as the gateway does).
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().header("X-A", "1").build();
        /// assert_eq!(r.headers()[0].name, "x-a");
        /// ```
        pub fn header(mut self, name: &str, value: &str) -> Self {
            self.0
                .headers
                .push(Pair::new(name.to_ascii_lowercase(), value));
            self
        }
        /// Adds a query parameter.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().query("a", "1").build();
        /// assert_eq!(r.query("a").as_deref(), Some("1"));
        /// ```
        pub fn query(mut self, name: &str, value: &str) -> Self {
            self.0.query.push(Pair::new(name, value));
            self
        }
        /// Adds a context value, as an earlier policy would.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().context("jwt.sub", "ann").build();
        /// assert_eq!(r.context("jwt.sub").as_deref(), Some("ann"));
        /// ```
        pub fn context(mut self, key: &str, value: &str) -> Self {
            self.0.context.push(Pair::new(key, value));
            self
        }
        /// Sets the path.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().path("/a").build();
        /// assert_eq!(r.path(), "/a");
        /// ```
        pub fn path(mut self, path: &str) -> Self {
            self.0.path = path.into();
            self
        }
        /// Sets the API name.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().api("chat").build();
        /// assert_eq!(r.api(), "chat");
        /// ```
        pub fn api(mut self, api: &str) -> Self {
            self.0.api = api.into();
            self
        }
        /// Sets the product.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().product("gold").build();
        /// assert_eq!(r.product().as_deref(), Some("gold"));
        /// ```
        pub fn product(mut self, product: &str) -> Self {
            self.0.product = Some(product.into());
            self
        }
        /// Sets the client's address ("ip:port").
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().client_address("[::1]:4000").build();
        /// assert_eq!(r.client_address(), "[::1]:4000");
        /// ```
        pub fn client_address(mut self, address: &str) -> Self {
            self.0.client_address = address.into();
            self
        }
        /// Sets the client's IP as filters judge it.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().client_ip("203.0.113.5").build();
        /// assert_eq!(r.client_ip().as_deref(), Some("203.0.113.5"));
        /// ```
        pub fn client_ip(mut self, ip: &str) -> Self {
            self.0.client_ip = Some(ip.into());
            self
        }
        /// Makes the client's IP unknown (a trusted proxy's `X-Forwarded-For` unreadable).
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().unknown_client_ip().build();
        /// assert_eq!(r.client_ip(), None);
        /// ```
        pub fn unknown_client_ip(mut self) -> Self {
            self.0.client_ip = None;
            self
        }
        /// Sets the TLS facts (a wss client).
        ///
        /// ```
        /// let tls = tollgate_sdk::TlsInfo { version: "TLSv1.3".into(), cipher_suite: "X".into(), server_name: None };
        /// let r = tollgate_sdk::testing::request().tls(tls).build();
        /// assert_eq!(r.tls().unwrap().version, "TLSv1.3");
        /// ```
        pub fn tls(mut self, tls: TlsInfo) -> Self {
            self.0.tls = Some(tls);
            self
        }
        /// Sets when the handshake arrived (seconds since the Unix epoch).
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().received_at(1_700_000_000).build();
        /// assert_eq!(r.received_at(), 1_700_000_000);
        /// ```
        pub fn received_at(mut self, unix_seconds: u64) -> Self {
            self.0.received_at = unix_seconds;
            self
        }
        /// The request.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().build();
        /// assert_eq!(r.method(), "GET");
        /// ```
        #[cfg(not(target_arch = "wasm32"))]
        pub fn build(self) -> crate::Request<'static> {
            crate::Request {
                data: self.0,
                _borrow: std::marker::PhantomData,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Cfg {
        n: u32,
    }

    struct Counting;

    impl Policy for Counting {
        type Config = Cfg;
        const CAPABILITIES: &'static [Capability] = &[Capability::UseContext];
        fn on_handshake(config: &Cfg, _: &Request) -> Result<Decision, String> {
            Ok(Proceed::new().context("n", config.n.to_string()).into())
        }
    }

    #[test]
    fn an_instance_parses_its_config_once() {
        CONFIG.with(|c| *c.borrow_mut() = None);
        let parses = std::cell::Cell::new(0);
        let prepared = || {
            parses.set(parses.get() + 1);
            r#"{"n": 7}"#.to_owned()
        };
        let request = testing::request().build();
        for _ in 0..3 {
            let d =
                with_config::<Cfg, _>(prepared, |c| Counting::on_handshake(c, &request)).unwrap();
            assert_eq!(d.proceeding().unwrap().context[0].value, "7");
        }
        assert_eq!(parses.get(), 1, "parsed on the first handshake only");
        CONFIG.with(|c| *c.borrow_mut() = None);
    }

    /// Decides what each text message asks for; declares what [`OBEDIENT_DECLARES`] holds.
    struct Obedient;

    impl message::MessagePolicy for Obedient {
        type Config = Vec<String>;
        const CAPABILITIES: &'static [message::Capability] = &[];
        fn capabilities() -> Vec<message::Capability> {
            OBEDIENT_DECLARES.with(|d| d.borrow().clone())
        }
        fn on_message(
            _: &Vec<String>,
            connection: &message::Connection,
            m: message::Message,
        ) -> Result<message::MessageDecision, String> {
            use message::MessageDecision as D;
            let t = m.text().unwrap_or_default();
            Ok(match t.split_once(':') {
                _ if t == "drop" => D::Drop,
                _ if t == "bad-utf8" => D::Replace(vec![0xff]),
                _ if t == "context" => D::replace_text(connection.context.len().to_string()),
                Some(("close", code)) => D::close(code.parse().unwrap(), "x".repeat(4)),
                Some(("long-reason", n)) => D::close(1000, "x".repeat(n.parse().unwrap())),
                _ => D::Forward,
            })
        }
    }

    thread_local! {
        static OBEDIENT_DECLARES: RefCell<Vec<message::Capability>> =
            const { RefCell::new(Vec::new()) };
    }

    fn obey(
        declared: &[message::Capability],
        text: &str,
    ) -> Result<message::MessageDecision, String> {
        OBEDIENT_DECLARES.with(|d| *d.borrow_mut() = declared.to_vec());
        let c = testing::connection().context("jwt.sub", "ann").build();
        testing::on_message::<Obedient>("[]", &c, testing::text(text))
    }

    #[test]
    fn testing_on_message_judges_a_decision_as_the_gateway_does() {
        use message::Capability as C;
        // Forwarding needs nothing; each other decision its capability.
        assert!(obey(&[], "hello").is_ok());
        let e = obey(&[], "drop").unwrap_err();
        assert_eq!(
            e,
            "dropped a message without declaring the capability `drop-messages`"
        );
        assert!(obey(&[C::DropMessages], "drop").is_ok());
        let e = obey(&[], "close:1000").unwrap_err();
        assert!(e.contains("`close-connections`"), "{e}");
        let e = obey(&[C::UseContext], "context").unwrap_err();
        assert!(e.contains("`replace-messages`"), "{e}");
        // What a close frame cannot carry, and text that is not text.
        let all = [C::ReplaceMessages, C::DropMessages, C::CloseConnections];
        assert!(obey(&all, "close:1005").unwrap_err().contains("code 1005"));
        assert!(obey(&all, "close:4999").is_ok());
        assert!(obey(&all, "long-reason:123").is_ok());
        let e = obey(&all, "long-reason:124").unwrap_err();
        assert!(e.contains("124 bytes"), "{e}");
        assert!(obey(&all, "bad-utf8").unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn testing_on_message_shows_the_context_only_with_use_context() {
        use message::Capability as C;
        let seen = |declared: &[C]| {
            let d = obey(declared, "context").unwrap();
            String::from_utf8(d.replacement().unwrap().to_vec()).unwrap()
        };
        assert_eq!(seen(&[C::ReplaceMessages]), "0");
        assert_eq!(seen(&[C::ReplaceMessages, C::UseContext]), "1");
    }

    #[test]
    fn a_message_policy_shares_the_instance_config_cell() {
        CONFIG.with(|c| *c.borrow_mut() = None);
        let c = testing::connection().build();
        for _ in 0..2 {
            let d = with_config::<Vec<String>, _>(
                || r#"["a"]"#.to_owned(),
                |cfg| <Obedient as message::MessagePolicy>::on_message(cfg, &c, testing::text("x")),
            );
            assert!(matches!(d, Ok(message::MessageDecision::Forward)));
        }
        CONFIG.with(|c| *c.borrow_mut() = None);
    }

    #[test]
    fn an_unparsable_prepared_config_is_an_error_not_a_panic() {
        CONFIG.with(|c| *c.borrow_mut() = None);
        let r = with_config::<Cfg, _>(|| "{".to_owned(), |_| Ok(()));
        assert!(r.unwrap_err().contains("does not parse"));
        // Not remembered: a later call tries again.
        let r = with_config::<Cfg, _>(|| r#"{"n": 1}"#.to_owned(), |c| Ok(c.n));
        assert_eq!(r, Ok(1));
        CONFIG.with(|c| *c.borrow_mut() = None);
    }
}
