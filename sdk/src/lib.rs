//! The Rust SDK for Tollgate handshake policies.
//!
//! A policy is a WebAssembly component built for `wasm32-wasip2` against the
//! `handshake-policy` world in `wit/policy.wit`. This crate holds the generated bindings, so a
//! policy crate only implements [`Policy`] and calls [`export_policy!`]:
//!
//! ```
//! use tollgate_sdk::{export_policy, Decision, Declaration, HandshakeRequest, Policy, Proceed};
//!
//! struct Hello;
//!
//! impl Policy for Hello {
//!     fn declare() -> Declaration {
//!         Declaration { name: "hello".into(), version: "0.1.0".into(), capabilities: vec![] }
//!     }
//!     // Validate once at load; what is returned comes back with every handshake.
//!     fn configure(config_json: String) -> Result<String, String> {
//!         Ok(config_json)
//!     }
//!     fn on_handshake(_config: String, _request: HandshakeRequest) -> Decision {
//!         Decision::Proceed(Proceed::default())
//!     }
//! }
//!
//! #[cfg(target_arch = "wasm32")]
//! export_policy!(Hello with_types_in tollgate_sdk);
//!
//! // Natively, the same functions run as plain Rust (this is how a policy is unit-tested):
//! let config = Hello::configure("{}".into()).unwrap();
//! let decision = Hello::on_handshake(config, tollgate_sdk::testing::request().build());
//! assert!(matches!(decision, Decision::Proceed(_)));
//! ```
//!
//! (The `cfg` keeps native builds, which run the policy's unit tests, from trying to link the
//! component-model export names.)
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and drop the `.wasm` file into
//! the gateway's `plugin_dir`. On a native target the same crate compiles too, so a policy's
//! logic can be unit-tested with plain `cargo test`: [`host`] answers natively there (signature
//! checks by the gateway's own code, log lines captured), and [`testing`] builds requests.
//!
//! By default every handshake runs in a fresh instance; an attachment with
//! `instances = "pooled"` lets one warm instance serve many handshakes in turn. Either way,
//! keep nothing in statics between calls: put what `configure` worked out into the string it
//! returns instead, and the policy is correct under both strategies. The one exception is
//! [`Memo`], which remembers the parsed form of that string (a pure function of it).

wit_bindgen::generate!({
    path: "../wit",
    world: "handshake-policy",
    pub_export_macro: true,
    export_macro_name: "export_policy",
    default_bindings_module: "tollgate_sdk",
    generate_all,
});

/// The trait a policy implements (the exported `policy` interface).
pub use exports::tollgate::policy::policy::Guest as Policy;
/// Everything host and policy exchange.
pub use tollgate::policy::types::{
    Capability, Decision, Declaration, HandshakeRequest, HeaderChange, Pair, Proceed, QueryChange,
    Rejection, TlsInfo,
};
/// Raw bindings of the host interfaces; prefer [`host`], which also works in native tests.
pub use tollgate::policy::{log, signatures};

impl Default for Proceed {
    /// Continue unchanged.
    fn default() -> Self {
        Proceed {
            header_changes: Vec::new(),
            query_changes: Vec::new(),
            response_headers: Vec::new(),
            context: Vec::new(),
        }
    }
}

impl HandshakeRequest {
    /// The first value of header `name` (case-insensitive).
    ///
    /// ```
    /// # let request = tollgate_sdk::testing::request().header("Authorization", "Bearer t0k").build();
    /// let token = request.header("authorization");
    /// assert_eq!(token, Some("Bearer t0k"));
    /// assert_eq!(request.header("AUTHORIZATION"), token);
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
            .map(|p| p.value.as_str())
    }

    /// The first value of query parameter `name`.
    ///
    /// ```
    /// # let request = tollgate_sdk::testing::request().query("access_token", "t0k").build();
    /// let token = request.query_param("access_token");
    /// assert_eq!(token, Some("t0k"));
    /// assert_eq!(request.query_param("Access_Token"), None); // names are case-sensitive
    /// ```
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    }

    /// A context value set by an earlier policy, e.g. `jwt.sub`.
    ///
    /// ```
    /// # let request = tollgate_sdk::testing::request().context("jwt.sub", "ann").build();
    /// let user = request.context_value("jwt.sub");
    /// assert_eq!(user, Some("ann"));
    /// ```
    pub fn context_value(&self, key: &str) -> Option<&str> {
        self.context
            .iter()
            .find(|p| p.name == key)
            .map(|p| p.value.as_str())
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

/// Remembers the parsed form of the prepared config an instance was last called with, so a
/// warm instance (`instances = "pooled"`) parses it once instead of on every handshake.
///
/// Parsing the config string is often the largest part of a small policy's call (measured:
/// about a third of jwt-validate's own time). This is the one kind of state that may live in
/// a static: it is a pure function of the `config` argument, which the gateway passes again
/// with every call, so a fresh instance computes it once and a pooled one reuses it, and the
/// decision is the same either way. Only successful parses are kept; a different config
/// string (another attachment, after a reload) is parsed anew.
///
/// ```
/// use std::rc::Rc;
/// use tollgate_sdk::Memo;
///
/// struct Settings { header: String }
///
/// fn parse(json: &str) -> Result<Settings, String> {
///     Ok(Settings { header: json.trim_matches('"').to_owned() })
/// }
///
/// thread_local! {
///     static SETTINGS: Memo<Settings> = const { Memo::new() };
/// }
///
/// let first: Rc<Settings> = SETTINGS.with(|m| m.get_or_parse("\"x-user\"", parse)).unwrap();
/// let again = SETTINGS.with(|m| m.get_or_parse("\"x-user\"", parse)).unwrap();
/// assert!(Rc::ptr_eq(&first, &again)); // parsed once
/// assert_eq!(again.header, "x-user");
/// ```
pub struct Memo<T> {
    last: std::cell::RefCell<Option<(String, std::rc::Rc<T>)>>,
}

impl<T> Memo<T> {
    /// An empty memo; `const` so it can initialise a `thread_local!` without a lazy check.
    ///
    /// ```
    /// thread_local! {
    ///     static CONFIG: tollgate_sdk::Memo<u32> = const { tollgate_sdk::Memo::new() };
    /// }
    /// ```
    pub const fn new() -> Memo<T> {
        Memo {
            last: std::cell::RefCell::new(None),
        }
    }

    /// The parsed form of `config`: the remembered one if `config` is the string it was
    /// parsed from, else `parse(config)` (remembered when it succeeds).
    ///
    /// ```
    /// let memo = tollgate_sdk::Memo::new();
    /// let n = memo.get_or_parse("42", |s| s.parse::<u32>()).unwrap();
    /// assert_eq!(*n, 42);
    /// assert!(memo.get_or_parse("x", |s| s.parse::<u32>()).is_err());
    /// ```
    pub fn get_or_parse<E>(
        &self,
        config: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<std::rc::Rc<T>, E> {
        if let Some((key, value)) = self.last.borrow().as_ref() {
            if key == config {
                return Ok(value.clone());
            }
        }
        let value = std::rc::Rc::new(parse(config)?);
        *self.last.borrow_mut() = Some((config.to_owned(), value.clone()));
        Ok(value)
    }
}

impl<T> Default for Memo<T> {
    fn default() -> Memo<T> {
        Memo::new()
    }
}

/// Calls into the gateway. In a component these are the WIT imports; natively (unit tests)
/// they are served in-process: [`host::verify`] by the gateway's own verification code and
/// [`host::log`] into a buffer [`testing::take_logs`] returns.
pub mod host {
    pub use crate::log::Level;
    pub use crate::signatures::{Algorithm, Key, RsaPublicKey};

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
        crate::log::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::LOGS.with(|l| l.borrow_mut().push((level, message.to_owned())));
    }

    /// Verifies a signature natively in the host. `Ok(false)`: it does not verify; `Err`: the
    /// key cannot be used with `alg` (a key is only used with its own family).
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
            crate::signatures::verify(alg, key, message, signature)
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
        let alg = match alg {
            Algorithm::Rs256 => A::Rs256,
            Algorithm::Rs384 => A::Rs384,
            Algorithm::Rs512 => A::Rs512,
            Algorithm::Ps256 => A::Ps256,
            Algorithm::Ps384 => A::Ps384,
            Algorithm::Ps512 => A::Ps512,
            Algorithm::Es256 => A::Es256,
            Algorithm::Es384 => A::Es384,
            Algorithm::EdDsa => A::EdDsa,
            Algorithm::Hs256 => A::Hs256,
            Algorithm::Hs384 => A::Hs384,
            Algorithm::Hs512 => A::Hs512,
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
}

/// Unit-testing a policy with plain `cargo test`, no gateway: build requests, read what the
/// policy logged.
///
/// ```
/// use tollgate_sdk::testing::request;
/// let r = request().header("authorization", "Bearer x").query("room", "1").build();
/// assert_eq!(r.header("Authorization"), Some("Bearer x"));
/// assert_eq!(r.query_param("room"), Some("1"));
/// ```
pub mod testing {
    use crate::{HandshakeRequest, Pair};

    #[cfg(not(target_arch = "wasm32"))]
    thread_local! {
        pub(crate) static LOGS: std::cell::RefCell<Vec<(crate::host::Level, String)>> =
            const { std::cell::RefCell::new(Vec::new()) };
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

    /// A `GET /` handshake of API `test`, received now, with no headers.
    ///
    /// ```
    /// let r = tollgate_sdk::testing::request().path("/chat/7").build();
    /// assert_eq!(r.path, "/chat/7");
    /// ```
    pub fn request() -> RequestBuilder {
        RequestBuilder(HandshakeRequest {
            method: "GET".into(),
            path: "/".into(),
            query: Vec::new(),
            headers: Vec::new(),
            client_address: "127.0.0.1:50000".into(),
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

    /// Builds a [`HandshakeRequest`] step by step; see [`request`].
    pub struct RequestBuilder(HandshakeRequest);

    impl RequestBuilder {
        /// Adds a header (the name is lower-cased, as the gateway does).
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().header("X-A", "1").build();
        /// assert_eq!(r.headers[0].name, "x-a");
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
        /// assert_eq!(r.query_param("a"), Some("1"));
        /// ```
        pub fn query(mut self, name: &str, value: &str) -> Self {
            self.0.query.push(Pair::new(name, value));
            self
        }
        /// Adds a context value, as an earlier policy would.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().context("jwt.sub", "ann").build();
        /// assert_eq!(r.context_value("jwt.sub"), Some("ann"));
        /// ```
        pub fn context(mut self, key: &str, value: &str) -> Self {
            self.0.context.push(Pair::new(key, value));
            self
        }
        /// Sets the path.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().path("/a").build();
        /// assert_eq!(r.path, "/a");
        /// ```
        pub fn path(mut self, path: &str) -> Self {
            self.0.path = path.into();
            self
        }
        /// Sets the API name.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().api("chat").build();
        /// assert_eq!(r.api, "chat");
        /// ```
        pub fn api(mut self, api: &str) -> Self {
            self.0.api = api.into();
            self
        }
        /// Sets when the handshake arrived (seconds since the Unix epoch).
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().received_at(1_700_000_000).build();
        /// assert_eq!(r.received_at, 1_700_000_000);
        /// ```
        pub fn received_at(mut self, unix_seconds: u64) -> Self {
            self.0.received_at = unix_seconds;
            self
        }
        /// The request.
        ///
        /// ```
        /// let r = tollgate_sdk::testing::request().build();
        /// assert_eq!(r.method, "GET");
        /// ```
        pub fn build(self) -> HandshakeRequest {
            self.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Memo;
    use std::cell::Cell;

    #[test]
    fn memo_parses_each_config_once_and_never_keeps_a_failure() {
        let parses = Cell::new(0);
        let parse = |s: &str| {
            parses.set(parses.get() + 1);
            s.parse::<u32>()
        };
        let memo = Memo::new();
        assert_eq!(*memo.get_or_parse("1", parse).unwrap(), 1);
        assert_eq!(*memo.get_or_parse("1", parse).unwrap(), 1);
        assert_eq!(parses.get(), 1, "same config: parsed once");
        // Another attachment's (or a reloaded) config is parsed anew, not mistaken for the old.
        assert_eq!(*memo.get_or_parse("2", parse).unwrap(), 2);
        assert_eq!(parses.get(), 2);
        assert!(memo.get_or_parse("bad", parse).is_err());
        assert!(memo.get_or_parse("bad", parse).is_err());
        assert_eq!(parses.get(), 4, "a failed parse is not remembered");
        // A failure does not evict what was good.
        assert_eq!(*memo.get_or_parse("2", parse).unwrap(), 2);
        assert_eq!(parses.get(), 4);
    }
}
