//! Message policies: the `message-policy` world of `wit/policy.wit`, called for every whole
//! data message of the connections of the APIs it is attached to (`[[apis.on_message]]`).
//!
//! A config type, a [`MessagePolicy`] impl and one
//! [`export_message_policy!`](crate::export_message_policy), as a handshake policy is a
//! [`Policy`](crate::Policy) and [`export!`](crate::export):
//!
//! ```
//! use tollgate_sdk::message::{Capability, Connection, Message, MessageDecision, MessagePolicy};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { max_len: usize }
//!
//! struct Short;
//!
//! impl MessagePolicy for Short {
//!     type Config = Config;
//!     const CAPABILITIES: &'static [Capability] = &[Capability::CloseConnections];
//!     fn on_message(config: &Config, _: &Connection, m: Message) -> Result<MessageDecision, String> {
//!         Ok(match m.text() {
//!             Some(t) if t.len() > config.max_len => MessageDecision::close(1009, "too long"),
//!             _ => MessageDecision::Forward,
//!         })
//!     }
//! }
//!
//! tollgate_sdk::export_message_policy!(Short);
//!
//! // Natively the same code runs as plain Rust: this is how a message policy is unit-tested.
//! use tollgate_sdk::testing::{connection, on_message, text};
//! let d = on_message::<Short>(r#"{"max_len": 3}"#, &connection().build(), text("four")).unwrap();
//! assert_eq!(d.closing().unwrap().code, 1009);
//! ```
//!
//! Why its own module: the WIT gives the message scope interfaces of its own (`message-types`,
//! `message`) so the two scopes grow apart without touching each other, and two of their names
//! exist in both with other members (`Capability`, `Declaration`). Kept here under the WIT's
//! names, a message policy reads like a handshake one (`use tollgate_sdk::message::*` instead
//! of the crate root's names), and a handshake `Capability` cannot be passed where a message
//! one is meant. What both scopes share ([`Pair`](crate::Pair), [`host::log`](crate::host::log))
//! stays at the crate root.
//!
//! What the SDK does for it is what it does for a handshake policy: the declaration's name and
//! version come from Cargo metadata, the config is checked at load and parsed once per
//! instance, `Err` from [`MessagePolicy::on_message`] means "could not decide" (the gateway
//! closes the connection 1011 and logs the message; no peer sees it). Of the host calls, a
//! message policy has [`host::log`](crate::host::log) only: its world imports `log` and
//! `config`, and the gateway refuses at load a message policy that imports anything else
//! (`host::verify`, key sets, counters).

/// What a message policy may say it does ([`MessagePolicy::CAPABILITIES`]): the message
/// scope's own list, not the handshake one ([`crate::Capability`]). Forwarding needs none.
///
/// ```
/// use tollgate_sdk::message::Capability;
/// let declared = [Capability::DropMessages, Capability::UseContext];
/// assert!(declared.contains(&Capability::UseContext)); // sees the handshake's context
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::Capability;

/// The close frame of [`MessageDecision::Close`]; build it with [`MessageDecision::close`].
///
/// ```
/// use tollgate_sdk::message::{CloseConnection, MessageDecision};
/// let c = CloseConnection { code: 1008, reason: "no".into() };
/// assert!(matches!(MessageDecision::Close(c), MessageDecision::Close(ref c) if c.code == 1008));
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::CloseConnection;

/// The connection a message travels on, as its handshake left it (API, product, subscription,
/// and with `use-context` the context). Built natively with [`crate::testing::connection`].
///
/// ```
/// let c = tollgate_sdk::testing::connection().api("chat").context("jwt.sub", "ann").build();
/// assert_eq!((c.api.as_str(), c.context("jwt.sub")), ("chat", Some("ann")));
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::Connection;

/// A message policy's description of itself; [`export_message_policy!`](crate::export_message_policy)
/// builds it from Cargo metadata and [`MessagePolicy::capabilities`], so a policy never writes
/// one.
///
/// ```
/// use tollgate_sdk::message::{Capability, Declaration};
/// let d = Declaration { name: "no-shouting".into(), version: "0.1.0".into(),
///                       capabilities: vec![Capability::ReplaceMessages] };
/// assert_eq!(d.name, "no-shouting");
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::Declaration;

/// Who sent a message: `Client` (it goes to the backend) or `Backend` (it goes to the client).
///
/// ```
/// use tollgate_sdk::message::{Direction, Message};
/// let m = Message { direction: Direction::Backend, ..tollgate_sdk::testing::text("hi") };
/// assert_eq!(m.direction, Direction::Backend);
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::Direction;

/// A message's kind: `Text` (UTF-8, checked by the gateway; read it with [`Message::text`]) or
/// `Binary`.
///
/// ```
/// use tollgate_sdk::message::Kind;
/// assert_eq!(tollgate_sdk::testing::binary([1, 2]).kind, Kind::Binary);
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::Kind;

/// One whole data message (fragments joined, unmasked) with its direction and kind; a
/// [`MessagePolicy::on_message`] gets it to keep. Built natively with
/// [`crate::testing::text`] and [`crate::testing::binary`].
///
/// ```
/// let m = tollgate_sdk::testing::text("hello");
/// assert_eq!(m.text(), Some("hello"));
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::Message;

/// What the other side gets: `Forward` (the message as it came), `Replace(payload)` (needs
/// `replace-messages`), `Drop` (needs `drop-messages`) or `Close` (needs
/// `close-connections`). See [`MessageDecision::replace_text`] and [`MessageDecision::close`].
///
/// ```
/// use tollgate_sdk::message::MessageDecision;
/// let decisions = [MessageDecision::Forward, MessageDecision::Drop,
///                  MessageDecision::replace_text("x"), MessageDecision::close(1000, "bye")];
/// assert_eq!(decisions.iter().filter(|d| d.replacement().is_some()).count(), 1);
/// ```
pub use crate::message_bindings::tollgate::policy::message_types::MessageDecision;

/// A message policy. Implement it on a unit struct and pass that to
/// [`export_message_policy!`](crate::export_message_policy). Everything but `on_message` works
/// as in [`Policy`](crate::Policy).
///
/// ```
/// use tollgate_sdk::message::{Capability, Connection, Message, MessageDecision, MessagePolicy};
///
/// #[derive(serde::Deserialize)]
/// struct Config { banned: String }
///
/// struct Ban;
///
/// impl MessagePolicy for Ban {
///     type Config = Config;
///     const CAPABILITIES: &'static [Capability] = &[Capability::DropMessages];
///     fn check(config: &Config) -> Result<(), String> {
///         if config.banned.is_empty() { return Err("`banned` is empty".into()) }
///         Ok(())
///     }
///     fn on_message(config: &Config, _: &Connection, m: Message) -> Result<MessageDecision, String> {
///         Ok(match m.text() {
///             Some(t) if t.contains(&config.banned) => MessageDecision::Drop,
///             _ => MessageDecision::Forward,
///         })
///     }
/// }
///
/// assert!(Ban::configure(r#"{"banned": ""}"#).is_err());
/// assert!(Ban::configure(r#"{"colour": 1}"#).is_err());
/// assert!(Ban::configure(r#"{"banned": "spam"}"#).is_ok());
/// ```
pub trait MessagePolicy {
    /// The attachment's config as the policy uses it: the manifest's `config` table (as JSON),
    /// or whatever [`MessagePolicy::configure`] prepared from it. Parsed once per instance, not
    /// per message.
    ///
    /// ```
    /// // `config = { fields = ["/password"] }` in the manifest arrives as:
    /// #[derive(serde::Deserialize)]
    /// struct Config { fields: Vec<String> }
    /// let c: Config = serde_json::from_str(r#"{"fields": ["/password"]}"#).unwrap();
    /// assert_eq!(c.fields, ["/password"]);
    /// ```
    type Config: serde::de::DeserializeOwned + 'static;

    /// What the policy may decide besides forwarding (which needs nothing), and whether it
    /// sees the handshake's context. A decision that needs a capability not listed here fails
    /// the call: the gateway closes the connection 1011.
    ///
    /// ```
    /// use tollgate_sdk::message::Capability;
    /// // Rewrites and drops messages, never closes a connection.
    /// const CAPABILITIES: &[Capability] = &[Capability::ReplaceMessages, Capability::DropMessages];
    /// assert!(!CAPABILITIES.contains(&Capability::CloseConnections));
    /// ```
    const CAPABILITIES: &'static [Capability];

    /// The declared capabilities; override only when they are computed.
    ///
    /// ```
    /// # use tollgate_sdk::message::*;
    /// # struct P;
    /// # impl MessagePolicy for P {
    /// #     type Config = serde::de::IgnoredAny;
    /// #     const CAPABILITIES: &'static [Capability] = &[Capability::DropMessages];
    /// #     fn on_message(_: &Self::Config, _: &Connection, _: Message) -> Result<MessageDecision, String> { Ok(MessageDecision::Forward) }
    /// # }
    /// assert_eq!(P::capabilities(), vec![Capability::DropMessages]);
    /// ```
    fn capabilities() -> Vec<Capability> {
        Self::CAPABILITIES.to_vec()
    }

    /// Checks a parsed config beyond what its type says (called at load, by the default
    /// [`MessagePolicy::configure`]); an error stops the gateway's start or reload.
    ///
    /// ```
    /// # use tollgate_sdk::message::*;
    /// # struct P;
    /// # impl MessagePolicy for P {
    /// #     type Config = u32;
    /// #     const CAPABILITIES: &'static [Capability] = &[];
    /// #     fn on_message(_: &u32, _: &Connection, _: Message) -> Result<MessageDecision, String> { Ok(MessageDecision::Forward) }
    /// # }
    /// assert_eq!(P::check(&7), Ok(())); // the default accepts what parses
    /// ```
    fn check(_config: &Self::Config) -> Result<(), String> {
        Ok(())
    }

    /// Runs once per attachment at load with the manifest's `config` table as JSON; returns
    /// the prepared config every instance parses into [`MessagePolicy::Config`]. The default
    /// parses and [`MessagePolicy::check`]s it, then passes the JSON on unchanged. Override it
    /// to do work once instead of per message (compile a pattern, read granted files) and
    /// return the result as JSON of `Config`.
    ///
    /// ```
    /// # use tollgate_sdk::message::*;
    /// # struct P;
    /// # impl MessagePolicy for P {
    /// #     type Config = Vec<String>;
    /// #     const CAPABILITIES: &'static [Capability] = &[];
    /// #     fn on_message(_: &Vec<String>, _: &Connection, _: Message) -> Result<MessageDecision, String> { Ok(MessageDecision::Forward) }
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

    /// Decides one whole data message (every fragment joined, unmasked; control frames never
    /// come here). `Err`: the policy could not decide; the connection is closed 1011 and the
    /// message goes to the gateway's log only.
    ///
    /// The message is the policy's own (its payload can be taken or reused without a copy,
    /// see [`Message::into_text`]); the connection is lent, as a policy only reads it and a
    /// test reuses one for many messages.
    ///
    /// ```
    /// use tollgate_sdk::message::*;
    /// struct Shout;
    /// impl MessagePolicy for Shout {
    ///     type Config = serde::de::IgnoredAny;
    ///     const CAPABILITIES: &'static [Capability] = &[Capability::ReplaceMessages];
    ///     fn on_message(_: &Self::Config, _: &Connection, m: Message) -> Result<MessageDecision, String> {
    ///         Ok(match m.into_text() {
    ///             Some(mut t) => { t.make_ascii_uppercase(); MessageDecision::replace_text(t) }
    ///             None => MessageDecision::Forward,
    ///         })
    ///     }
    /// }
    /// let c = tollgate_sdk::testing::connection().build();
    /// let d = Shout::on_message(&serde::de::IgnoredAny, &c, tollgate_sdk::testing::text("hi")).unwrap();
    /// assert_eq!(d.replacement(), Some(&b"HI"[..]));
    /// ```
    fn on_message(
        config: &Self::Config,
        connection: &Connection,
        message: Message,
    ) -> Result<MessageDecision, String>;
}

/// The body of the exported `on-message`: the instance's config (parsed on first use), then
/// the policy.
#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
pub fn __on_message<P: MessagePolicy>(
    connection: Connection,
    message: Message,
) -> Result<MessageDecision, String> {
    crate::with_config::<P::Config, _>(
        crate::bindings::tollgate::policy::config::prepared,
        |config| P::on_message(config, &connection, message),
    )
}

/// Exports a [`MessagePolicy`] as the component's `message` interface (the `message-policy`
/// world). Expands to nothing on non-wasm targets, so the crate still builds (and tests)
/// natively. A component is one kind of policy: call this or [`export!`](crate::export), not
/// both.
///
/// ```
/// use tollgate_sdk::message::*;
/// struct Pass;
/// impl MessagePolicy for Pass {
///     type Config = serde_json::Value;
///     const CAPABILITIES: &'static [Capability] = &[];
///     fn on_message(_: &serde_json::Value, _: &Connection, _: Message) -> Result<MessageDecision, String> {
///         Ok(MessageDecision::Forward)
///     }
/// }
/// tollgate_sdk::export_message_policy!(Pass);                       // name: the crate's package name
/// // tollgate_sdk::export_message_policy!(Pass, name = "pass-2");   // or an explicit one
/// ```
#[macro_export]
macro_rules! export_message_policy {
    ($policy:ty) => {
        $crate::export_message_policy!($policy, name = env!("CARGO_PKG_NAME"));
    };
    ($policy:ty, name = $name:expr) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __TollgateMessageExport;
            impl $crate::message_bindings::exports::tollgate::policy::message::Guest
                for __TollgateMessageExport
            {
                fn declare() -> $crate::message::Declaration {
                    $crate::message::Declaration {
                        name: ::std::string::String::from($name),
                        version: ::std::string::String::from(env!("CARGO_PKG_VERSION")),
                        capabilities: <$policy as $crate::message::MessagePolicy>::capabilities(),
                    }
                }
                fn configure(
                    config_json: ::std::string::String,
                ) -> ::std::result::Result<::std::string::String, ::std::string::String> {
                    <$policy as $crate::message::MessagePolicy>::configure(&config_json)
                }
                fn on_message(
                    connection: $crate::message::Connection,
                    message: $crate::message::Message,
                ) -> ::std::result::Result<$crate::message::MessageDecision, ::std::string::String>
                {
                    $crate::message::__on_message::<$policy>(connection, message)
                }
            }
            $crate::message_bindings::__export_message_policy!(
                __TollgateMessageExport with_types_in $crate::message_bindings
            );
        };
    };
}

impl MessageDecision {
    /// Forward `text` instead of the message (needs `replace-messages`). Replacing a text
    /// message with text keeps it valid UTF-8, which the gateway requires of a text message.
    ///
    /// ```
    /// let d = tollgate_sdk::message::MessageDecision::replace_text("[redacted]");
    /// assert_eq!(d.replacement(), Some(&b"[redacted]"[..]));
    /// ```
    pub fn replace_text(text: impl Into<String>) -> MessageDecision {
        MessageDecision::Replace(text.into().into_bytes())
    }

    /// End the connection (needs `close-connections`): the message's sender gets close `code`
    /// with `reason`, the other side 1001. `code` must be 1000, 1001, 1003, 1007, 1008, 1009,
    /// 1011 or 3000..4999 and `reason` at most 123 bytes, or the call fails (closed 1011).
    ///
    /// ```
    /// let d = tollgate_sdk::message::MessageDecision::close(1008, "not allowed here");
    /// assert_eq!(d.closing().unwrap().code, 1008);
    /// ```
    pub fn close(code: u16, reason: impl Into<String>) -> MessageDecision {
        MessageDecision::Close(CloseConnection {
            code,
            reason: reason.into(),
        })
    }

    /// The payload a `Replace` forwards instead of the message; `None` for other decisions.
    ///
    /// ```
    /// use tollgate_sdk::message::MessageDecision;
    /// assert_eq!(MessageDecision::Replace(vec![1, 2]).replacement(), Some(&[1u8, 2][..]));
    /// assert_eq!(MessageDecision::Forward.replacement(), None);
    /// ```
    pub fn replacement(&self) -> Option<&[u8]> {
        match self {
            MessageDecision::Replace(p) => Some(p),
            _ => None,
        }
    }

    /// The close frame a `Close` sends to the sender; `None` for other decisions.
    ///
    /// ```
    /// use tollgate_sdk::message::MessageDecision;
    /// let d = MessageDecision::close(4000, "bye");
    /// assert_eq!(d.closing().map(|c| c.reason.as_str()), Some("bye"));
    /// assert!(MessageDecision::Drop.closing().is_none());
    /// ```
    pub fn closing(&self) -> Option<&CloseConnection> {
        match self {
            MessageDecision::Close(c) => Some(c),
            _ => None,
        }
    }
}

impl Message {
    /// The payload of a text message as `&str`, without a copy; `None` for a binary message
    /// (the gateway checked that a text message is UTF-8, so only a hand-built one with bad
    /// bytes is `None` too).
    ///
    /// ```
    /// use tollgate_sdk::testing::{binary, text};
    /// assert_eq!(text("hello").text(), Some("hello"));
    /// assert_eq!(binary([0xff]).text(), None);
    /// ```
    pub fn text(&self) -> Option<&str> {
        match self.kind {
            Kind::Text => std::str::from_utf8(&self.payload).ok(),
            Kind::Binary => None,
        }
    }

    /// The payload of a text message as an owned `String`, reusing its buffer (no copy), e.g.
    /// to change it in place and hand it to [`MessageDecision::replace_text`]; `None` as for
    /// [`Message::text`].
    ///
    /// ```
    /// let mut t = tollgate_sdk::testing::text("hi").into_text().unwrap();
    /// t.make_ascii_uppercase();
    /// assert_eq!(t, "HI");
    /// ```
    pub fn into_text(self) -> Option<String> {
        match self.kind {
            Kind::Text => String::from_utf8(self.payload).ok(),
            Kind::Binary => None,
        }
    }
}

impl Connection {
    /// The first context value named `name` that the onHandshake chain left (e.g. `jwt.sub`),
    /// without a copy. The gateway sends the context only to a policy that declares
    /// `use-context`: without it, every lookup is `None`.
    ///
    /// ```
    /// let c = tollgate_sdk::testing::connection().context("jwt.sub", "ann").build();
    /// assert_eq!(c.context("jwt.sub"), Some("ann"));
    /// assert_eq!(c.context("jwt.tenant"), None);
    /// ```
    pub fn context(&self, name: &str) -> Option<&str> {
        self.context
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    }
}
