//! `[[apis.message_limits]]` and `[[products.message_limits]]`: message rates per connection or
//! subscription and direction, enforced by the relay without any wasm (see
//! `tollgate_edge::rate` for how a message is judged).

use toml::Spanned;

use super::Validator;
use crate::model::{MessageRates, Rate, RateAction, RateSpec};
use crate::raw::RawMessageLimits;

/// The rates an API or a product sets, per direction.
#[derive(Default)]
pub(super) struct MessageLimits {
    pub(super) client: MessageRates,
    pub(super) backend: MessageRates,
}

impl Validator<'_> {
    /// The `message_limits` entries of `scope` (`apis[i]` or `products[i]`): each names at
    /// least one rate, and each direction is limited by one entry at most per connection and
    /// one per subscription (two would leave the reader guessing which one holds).
    /// `no_subscriptions` says why `per = "subscription"` cannot apply there, if it cannot.
    pub(super) fn message_limits(
        &mut self,
        scope: &str,
        list: &[Spanned<RawMessageLimits>],
        no_subscriptions: Option<&str>,
    ) -> MessageLimits {
        let mut out = MessageLimits::default();
        for (n, entry) in list.iter().enumerate() {
            let key = format!("{scope}.message_limits[{n}]");
            let m = entry.get_ref();
            // Every key of the entry is checked before a bad one skips it, so one run lists
            // all of its mistakes.
            let directions = match m.direction.as_ref().map(|d| (d.get_ref().trim(), d)) {
                None | Some(("client", _)) => Some((true, false)),
                Some(("backend", _)) => Some((false, true)),
                Some(("both", _)) => Some((true, true)),
                Some((other, d)) => {
                    self.err(
                        d.span(),
                        format!("{key}.direction"),
                        format!(
                            "`{other}` is not a direction: write \"client\" (the client's messages), \"backend\" or \"both\""
                        ),
                    );
                    None
                }
            };
            let per_subscription = match m.per.as_ref().map(|p| (p.get_ref().trim(), p)) {
                None | Some(("connection", _)) => Some(false),
                Some(("subscription", p)) if no_subscriptions.is_some() => {
                    self.err(
                        p.span(),
                        format!("{key}.per"),
                        no_subscriptions.unwrap_or_default().to_owned(),
                    );
                    None
                }
                Some(("subscription", _)) => Some(true),
                Some((other, p)) => {
                    self.err(
                        p.span(),
                        format!("{key}.per"),
                        format!("`{other}` is not what a limit counts: write \"connection\" or \"subscription\""),
                    );
                    None
                }
            };
            let action = match m.action.as_ref().map(|a| (a.get_ref().trim(), a)) {
                None | Some(("close", _)) => Some(RateAction::Close),
                Some(("drop", _)) => Some(RateAction::Drop),
                Some((other, a)) => {
                    self.err(
                        a.span(),
                        format!("{key}.action"),
                        format!("`{other}` is not an action: write \"close\" or \"drop\""),
                    );
                    None
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
            if let (Ok(None), Ok(None)) = (messages, bytes) {
                self.err(
                    entry.span(),
                    key,
                    "limits nothing: set max_messages_per_second, max_bytes_per_second or both",
                );
                continue;
            }
            let (
                Some((client, backend)),
                Some(per_subscription),
                Some(action),
                Ok(messages),
                Ok(bytes),
            ) = (directions, per_subscription, action, messages, bytes)
            else {
                continue;
            };
            let spec = RateSpec {
                messages,
                bytes,
                action,
            };
            let per = if per_subscription {
                "subscription"
            } else {
                "connection"
            };
            for (wanted, rates, name) in [
                (client, &mut out.client, "client"),
                (backend, &mut out.backend, "backend"),
            ] {
                if !wanted {
                    continue;
                }
                let slot = if per_subscription {
                    &mut rates.per_subscription
                } else {
                    &mut rates.per_connection
                };
                if slot.is_some() {
                    // Named by its `direction` where it has one (else the entry: the default).
                    let (at, k) = match &m.direction {
                        Some(d) => (d.span(), format!("{key}.direction")),
                        None => (entry.span(), key.clone()),
                    };
                    self.err(
                        at,
                        k,
                        format!(
                            "the {name}'s messages are already limited per {per} by an earlier entry: one entry per direction and `per`"
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
            l.client_messages.per_connection,
            Some(RateSpec {
                messages: Some(Rate {
                    per_second: 20,
                    burst: 20
                }),
                bytes: None,
                action: RateAction::Close,
            })
        );
        assert!(l.backend_messages.is_empty());
        assert_eq!(l.client_messages.per_subscription, None);
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
            l.backend_messages.per_connection.and_then(|s| s.bytes),
            Some(Rate {
                per_second: 1000,
                burst: 5000
            })
        );
        assert_eq!(
            l.backend_messages.per_connection.map(|s| s.action),
            Some(RateAction::Drop)
        );
        assert!(l.client_messages.per_connection.is_some());
        let e = p(&api(
            "[[apis.message_limits]]\ndirection = \"both\"\nmax_messages_per_second = 5\n\
             [[apis.message_limits]]\ndirection = \"backend\"\nmax_messages_per_second = 9\n",
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].key, "apis[0].message_limits[1].direction", "{e}");
        assert!(e.0[0].message.contains("already limited"), "{e}");
    }

    /// Per connection and per subscription are separate slots; per subscription needs products.
    #[test]
    fn per_subscription_is_its_own_slot_and_needs_a_product() {
        let in_product = |limits: &str| {
            format!(
                "{BASE}[[products]]\nname = \"gold\"\n[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\"]\n{limits}"
            )
        };
        let c = p(&in_product(
            "[[apis.message_limits]]\nmax_messages_per_second = 5\n\
             [[apis.message_limits]]\nper = \"subscription\"\nmax_messages_per_second = 8\n",
        ))
        .unwrap();
        let l = &c.apis[0].limits.client_messages;
        let rate = |s: Option<RateSpec>| s.and_then(|s| s.messages).map(|r| r.per_second);
        assert_eq!(rate(l.per_connection), Some(5));
        assert_eq!(rate(l.per_subscription), Some(8));
        let e = p(&api(
            "[[apis.message_limits]]\nper = \"subscription\"\nmax_messages_per_second = 8\n",
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].key, "apis[0].message_limits[0].per", "{e}");
        assert!(e.0[0].message.contains("in no product"), "{e}");
    }

    /// A product's limits are read like an API's, under its own key.
    #[test]
    fn a_product_has_message_limits_too() {
        let text = format!(
            "{BASE}[[products]]\nname = \"gold\"\n\
             [[products.message_limits]]\nper = \"subscription\"\ndirection = \"both\"\nmax_bytes_per_second = 4096\n\
             [[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\"]\n"
        );
        let c = p(&text).unwrap();
        let gold = &c.products[0];
        for rates in [gold.client_messages, gold.backend_messages] {
            assert_eq!(rates.per_connection, None);
            assert_eq!(
                rates
                    .per_subscription
                    .and_then(|s| s.bytes)
                    .map(|r| r.burst),
                Some(4096)
            );
        }
        let e = p(&text.replace("direction = \"both\"", "direction = \"sideways\"")).unwrap_err();
        assert_eq!(e.0[0].key, "products[0].message_limits[0].direction", "{e}");
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
                "per = \"tab\"\nmax_messages_per_second = 1\n",
                "per",
                "not what a limit counts",
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
        let e = p(&api(
            "[[apis.message_limits]]\ndirection = \"up\"\naction = \"kick\"\nmax_messages_per_second = 0\n",
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 3, "every mistake of the entry is listed: {e}");
        let e = p(&api("[[apis.message_limits]]\naction = \"drop\"\n")).unwrap_err();
        assert_eq!(e.0[0].key, "apis[0].message_limits[0]", "{e}");
        assert!(e.0[0].message.contains("limits nothing"), "{e}");
        let e = p(&api(
            "[[apis.message_limits]]\nwindow = 1\nmax_messages_per_second = 1\n",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
