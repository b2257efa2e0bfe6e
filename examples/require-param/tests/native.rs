//! The ten-line policy, natively: config through the load path, then a handshake.

use require_param::RequireParam;
use tollgate_sdk::testing::{handshake, request};

#[test]
fn a_handshake_without_the_parameter_is_refused_with_400() {
    let config = r#"{"param": "room"}"#;
    let with = request().query("room", "7").build();
    assert_eq!(
        handshake::<RequireParam>(config, &with).unwrap().status(),
        None
    );
    let without = request().query("other", "7").build();
    let d = handshake::<RequireParam>(config, &without).unwrap();
    assert_eq!(d.status(), Some(400));
    let tollgate_sdk::Decision::Reject(r) = d else {
        unreachable!()
    };
    assert_eq!(r.body, b"room required");
    // A config without `param` is refused at load, with serde's message.
    assert!(handshake::<RequireParam>("{}", &with)
        .unwrap_err()
        .contains("missing field `param`"));
}
