//! `[[apis.message_limits]]`: message rates per connection and direction, enforced by the relay
//! without any wasm (see `tollgate_edge::rate` for how a message is judged).

use toml::Spanned;

use super::Validator;
use crate::model::{Rate, RateAction, RateSpec};
use crate::raw::RawMessageLimits;

/// The rates in force on an API's connections, per direction.
#[derive(Default)]
pub(super) struct MessageLimits {
    pub(super) client: Option<RateSpec>,
    pub(super) backend: Option<RateSpec>,
}

impl Validator<'_> {
    /// API `i`'s `message_limits` entries: each names at least one rate, and each direction is
    /// limited by one entry at most (two would leave the reader guessing which one holds).
    pub(super) fn message_limits(
        &mut self,
        i: usize,
        list: &[Spanned<RawMessageLimits>],
    ) -> MessageLimits {
        let mut out = MessageLimits::default();
        for (n, entry) in list.iter().enumerate() {
            let key = format!("apis[{i}].message_limits[{n}]");
            let m = entry.get_ref();
            let (client, backend) = match m.direction.as_ref().map(|d| (d.get_ref().trim(), d)) {
                None | Some(("client", _)) => (true, false),
                Some(("backend", _)) => (false, true),
                Some(("both", _)) => (true, true),
                Some((other, d)) => {
                    self.err(
                        d.span(),
                        format!("{key}.direction"),
                        format!(
                            "`{other}` is not a direction: write \"client\" (the client's messages), \"backend\" or \"both\""
                        ),
                    );
                    continue;
                }
            };
            let action = match m.action.as_ref().map(|a| (a.get_ref().trim(), a)) {
                None | Some(("close", _)) => RateAction::Close,
                Some(("drop", _)) => RateAction::Drop,
                Some((other, a)) => {
                    self.err(
                        a.span(),
                        format!("{key}.action"),
                        format!("`{other}` is not an action: write \"close\" or \"drop\""),
                    );
                    continue;
                }
            };
            let messages = self.rate(
                &key,
                ("max_messages_per_second", &m.max_messages_per_second),
                ("burst_messages", &m.burst_messages),
            );
            let bytes = self.rate(
                &key,
                ("max_bytes_per_second", &m.max_bytes_per_second),
                ("burst_bytes", &m.burst_bytes),
            );
            let (Ok(messages), Ok(bytes)) = (messages, bytes) else {
                continue;
            };
            if messages.is_none() && bytes.is_none() {
                self.err(
                    entry.span(),
                    key,
                    "limits nothing: set max_messages_per_second, max_bytes_per_second or both",
                );
                continue;
            }
            let spec = RateSpec {
                messages,
                bytes,
                action,
            };
            for (wanted, slot, name) in [
                (client, &mut out.client, "client"),
                (backend, &mut out.backend, "backend"),
            ] {
                if !wanted {
                    continue;
                }
                if slot.is_some() {
                    let at = m.direction.as_ref().map_or(entry.span(), |d| d.span());
                    self.err(
                        at,
                        format!("{key}.direction"),
                        format!(
                            "the {name}'s messages are already limited by an earlier entry: one entry per direction"
                        ),
                    );
                } else {
                    *slot = Some(spec);
                }
            }
        }
        out
    }

    /// One rate and its burst: the rate more than 0; the burst, if given, at least 1 and only
    /// with its rate. `Err` when either is wrong (already reported).
    fn rate(
        &mut self,
        key: &str,
        (rate_key, rate): (&str, &Option<Spanned<u64>>),
        (burst_key, burst): (&str, &Option<Spanned<u64>>),
    ) -> Result<Option<Rate>, ()> {
        match (rate, burst) {
            (None, None) => Ok(None),
            (None, Some(b)) => {
                self.err(
                    b.span(),
                    format!("{key}.{burst_key}"),
                    format!("is a burst of {rate_key}, which is not set"),
                );
                Err(())
            }
            (Some(r), _) if *r.get_ref() == 0 => {
                self.err(
                    r.span(),
                    format!("{key}.{rate_key}"),
                    "must be at least 1 (to refuse every message, remove the API)",
                );
                Err(())
            }
            (Some(_), Some(b)) if *b.get_ref() == 0 => {
                self.err(b.span(), format!("{key}.{burst_key}"), "must be at least 1");
                Err(())
            }
            (Some(r), b) => Ok(Some(Rate {
                per_second: *r.get_ref(),
                burst: b.as_ref().map_or(*r.get_ref(), |b| *b.get_ref()),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::{Rate, RateAction, RateSpec};
    use crate::test_util::{p, BASE};

    fn api(limits: &str) -> String {
        format!("{BASE}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n{limits}")
    }

    #[test]
    fn defaults_client_close_and_burst_equal_to_the_rate() {
        let c = p(&api(
            "[[apis.message_limits]]\nmax_messages_per_second = 20\n",
        ))
        .unwrap();
        let l = &c.apis[0].limits;
        assert_eq!(
            l.client_messages,
            Some(RateSpec {
                messages: Some(Rate {
                    per_second: 20,
                    burst: 20
                }),
                bytes: None,
                action: RateAction::Close,
            })
        );
        assert_eq!(l.backend_messages, None);
    }

    #[test]
    fn one_entry_per_direction_and_both_covers_two() {
        let c = p(&api(
            "[[apis.message_limits]]\ndirection = \"backend\"\nmax_bytes_per_second = 1000\nburst_bytes = 5000\naction = \"drop\"\n\
             [[apis.message_limits]]\ndirection = \"client\"\nmax_messages_per_second = 5\n",
        ))
        .unwrap();
        let l = &c.apis[0].limits;
        assert_eq!(
            l.backend_messages.and_then(|s| s.bytes),
            Some(Rate {
                per_second: 1000,
                burst: 5000
            })
        );
        assert_eq!(l.backend_messages.map(|s| s.action), Some(RateAction::Drop));
        assert!(l.client_messages.is_some());
        let e = p(&api(
            "[[apis.message_limits]]\ndirection = \"both\"\nmax_messages_per_second = 5\n\
             [[apis.message_limits]]\ndirection = \"backend\"\nmax_messages_per_second = 9\n",
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].key, "apis[0].message_limits[1].direction", "{e}");
        assert!(e.0[0].message.contains("already limited"), "{e}");
    }

    #[test]
    fn each_mistake_names_its_key() {
        for (body, key, words) in [
            (
                "direction = \"up\"\nmax_messages_per_second = 1\n",
                "direction",
                "not a direction",
            ),
            (
                "action = \"kick\"\nmax_messages_per_second = 1\n",
                "action",
                "not an action",
            ),
            (
                "max_messages_per_second = 0\n",
                "max_messages_per_second",
                "at least 1",
            ),
            (
                "max_bytes_per_second = 10\nburst_bytes = 0\n",
                "burst_bytes",
                "at least 1",
            ),
            ("burst_messages = 3\n", "burst_messages", "which is not set"),
        ] {
            let e = p(&api(&format!("[[apis.message_limits]]\n{body}"))).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(
                e.0[0].key,
                format!("apis[0].message_limits[0].{key}"),
                "{e}"
            );
            assert!(e.0[0].message.contains(words), "{e}");
        }
        let e = p(&api("[[apis.message_limits]]\naction = \"drop\"\n")).unwrap_err();
        assert_eq!(e.0[0].key, "apis[0].message_limits[0]", "{e}");
        assert!(e.0[0].message.contains("limits nothing"), "{e}");
        let e = p(&api(
            "[[apis.message_limits]]\nper = \"tab\"\nmax_messages_per_second = 1\n",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
