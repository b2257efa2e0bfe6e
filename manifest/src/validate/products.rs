//! `[[products]]` and their subscriptions: names unique across the manifest, a key for every
//! subscription (resolved in `secrets`), and every product published by some API.
//!
//! Its own file because products are checked before the APIs that list them (an API needs to
//! know which of its products are open), and after all of them for the ones no API lists.

use std::collections::HashMap;

use toml::Spanned;

use super::Validator;
use crate::model::{ProductConfig, SubscriptionConfig};
use crate::raw::{RawApi, RawProduct, RawSubscription};
use crate::secrets::KeysFile;

impl Validator<'_> {
    /// `[[products]]`, with their policies and subscriptions, each subscription's keys resolved
    /// (from the environment, a digest, or `keys_file`, read here). Also returns each product's
    /// index by name, for the APIs that list them.
    pub(super) fn products(
        &mut self,
        list: &[RawProduct],
        keys_file: Option<&Spanned<String>>,
    ) -> (Vec<ProductConfig>, HashMap<String, usize>) {
        let mut keys_file = keys_file.and_then(|f| self.keys_file(f));
        let mut sub_names: HashMap<String, String> = HashMap::new();
        let mut products = Vec::new();
        let mut product_names = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            let pname = p.name.get_ref().trim().to_owned();
            if pname.is_empty() {
                self.err(
                    p.name.span(),
                    format!("products[{i}].name"),
                    "must not be empty",
                );
            } else if product_names.insert(pname.clone(), i).is_some() {
                self.err(
                    p.name.span(),
                    format!("products[{i}].name"),
                    format!("duplicate product name `{pname}`"),
                );
            }
            if let Some(apis) = &p.apis {
                self.err(
                    apis.span(),
                    format!("products[{i}].apis"),
                    format!("a product does not list its APIs: each API lists its products (one source of truth); add `products = [\"{pname}\"]` to those [[apis]] entries"),
                );
            }
            let policies = self.attachments(&p.policies, &format!("products[{i}].policies"));
            let message_limits =
                self.message_limits(&format!("products[{i}]"), &p.message_limits, None);
            let subscriptions =
                self.subscriptions(i, &p.subscriptions, &mut keys_file, &mut sub_names);
            products.push(ProductConfig {
                name: pname.clone(),
                display_name: p.display_name.clone().unwrap_or(pname),
                // APIM's default: a product is protected unless it says otherwise.
                subscription_required: p
                    .subscription_required
                    .as_ref()
                    .is_none_or(|r| *r.get_ref()),
                policies,
                subscriptions,
                client_messages: message_limits.client,
                backend_messages: message_limits.backend,
            });
        }
        if let Some(kf) = &keys_file {
            self.unused_keys(kf);
        }
        self.duplicate_keys(&products);
        (products, product_names)
    }

    /// The subscriptions of product `i`, each key resolved to its digest.
    fn subscriptions(
        &mut self,
        i: usize,
        list: &[Spanned<RawSubscription>],
        keys_file: &mut Option<KeysFile>,
        names: &mut HashMap<String, String>,
    ) -> Vec<SubscriptionConfig> {
        let mut out = Vec::new();
        for (j, sub) in list.iter().enumerate() {
            let path = format!("products[{i}].subscriptions[{j}]");
            let r = sub.get_ref();
            let name = r.name.get_ref().trim().to_owned();
            if name.is_empty() {
                self.err(r.name.span(), format!("{path}.name"), "must not be empty");
                continue;
            }
            if let Some(first) = names.insert(name.clone(), path.clone()) {
                self.err(
                    r.name.span(),
                    format!("{path}.name"),
                    format!("duplicate subscription name `{name}` (first used by {first}); names are unique across the manifest"),
                );
                continue;
            }
            self.sub_sites
                .insert(name.clone(), (path.clone(), sub.span()));
            if let Some(m) = &r.max_connections {
                if *m.get_ref() == 0 {
                    self.err(
                        m.span(),
                        format!("{path}.max_connections"),
                        "must be at least 1 (remove the subscription to shut it out)",
                    );
                }
            }
            let keys = self.subscription_keys(&path, &name, sub, keys_file);
            out.push(SubscriptionConfig {
                name,
                max_connections: r.max_connections.as_ref().map(|m| *m.get_ref()),
                keys,
            });
        }
        out
    }

    /// A product no API lists is most likely a typo in an API's `products`; its subscribers
    /// would reach nothing.
    pub(super) fn unpublished_products(&mut self, products: &[RawProduct], apis: &[RawApi]) {
        for (i, p) in products.iter().enumerate() {
            let pname = p.name.get_ref().trim();
            if !pname.is_empty()
                && !apis
                    .iter()
                    .any(|a| a.products.iter().any(|ap| ap.get_ref() == pname))
            {
                self.err(
                    p.name.span(),
                    format!("products[{i}].name"),
                    format!("product `{pname}` publishes no API: add `products = [\"{pname}\"]` to the [[apis]] entries it publishes"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::{hex, p, BASE};
    use crate::{key_digest, parse};

    #[test]
    fn products_and_subscriptions_are_validated_with_every_error_located() {
        let dir = std::env::temp_dir().join(format!("tollgate-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("keys.toml"),
            "[bob]\nprimary = \"short-secret\"\n\n[carol]\nprimary = \"carol-key-0123456789\"\n[nobody]\nprimary = \"nobody-key-0123456789\"\n",
        )
        .unwrap();
        std::env::remove_var("TOLLGATE_TEST_UNSET_KEY");
        let text = format!(
            "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n\
             [[products]]\nname = \"gold\"\napis = [\"a\"]\n\
             [[products.subscriptions]]\nname = \"alice\"\nprimary_key_env = \"TOLLGATE_TEST_UNSET_KEY\"\nsecondary_key_sha256 = \"abc\"\n\
             [[products.subscriptions]]\nname = \"bob\"\n\
             [[products.subscriptions]]\nname = \"carol\"\n\
             [[products.subscriptions]]\nname = \"dave\"\nprimary_key_sha256 = \"{}\"\n\
             [[products.subscriptions]]\nname = \"erin\"\n\
             [[products]]\nname = \"open1\"\nsubscription_required = false\n\
             [[products]]\nname = \"open2\"\nsubscription_required = false\n\
             [[products]]\nname = \"lonely\"\n\
             [[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\", \"open1\", \"open2\"]\n",
            hex(&key_digest("carol-key-0123456789"))
        );
        let e = parse(&dir.join("m.toml"), &text).unwrap_err();
        let shown = e.to_string();
        let has = |key: &str, what: &str| {
            e.0.iter()
                .any(|x| x.key == key && x.message.contains(what) && x.line > 0)
        };
        assert!(
            has("products[0].apis", "each API lists its products"),
            "{shown}"
        );
        assert!(
            has(
                "products[0].subscriptions[0].primary_key_env",
                "TOLLGATE_TEST_UNSET_KEY` is not set"
            ),
            "{shown}"
        );
        assert!(
            has(
                "products[0].subscriptions[0].secondary_key_sha256",
                "64 hex digits"
            ),
            "{shown}"
        );
        assert!(has("bob.primary", "at least 16 characters"), "{shown}");
        assert!(
            has("nobody", "no subscription is named `nobody`"),
            "{shown}"
        );
        assert!(
            has("products[0].subscriptions[3]", "have the same key"),
            "{shown}"
        );
        assert!(has("products[0].subscriptions[4]", "has no key"), "{shown}");
        assert!(
            has("apis[0].products", "at most one open product"),
            "{shown}"
        );
        assert!(has("products[3].name", "publishes no API"), "{shown}");
        // Errors found in the keys file name that file and its line.
        let bob = e.0.iter().find(|x| x.key == "bob.primary").unwrap();
        assert!(bob.file.ends_with("keys.toml") && bob.line == 2, "{bob}");
        // No key value is ever echoed.
        for secret in ["short-secret", "carol-key", "nobody-key"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn products_require_subscriptions_unless_they_say_otherwise() {
        std::env::set_var("TOLLGATE_TEST_SET_KEY", "0123456789abcdef0123");
        let c = p(&format!(
            "{BASE}[[products]]\nname = \"gold\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_env = \"TOLLGATE_TEST_SET_KEY\"\nmax_connections = 3\n\
             [[products]]\nname = \"free\"\nsubscription_required = false\n\
             [[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\", \"free\"]\nsubscription_key_header = \"X-Key\"\n"
        ))
        .unwrap();
        assert!(c.products[0].subscription_required);
        assert!(!c.products[1].subscription_required);
        assert_eq!(
            c.products[0].subscriptions[0].keys,
            vec![key_digest("0123456789abcdef0123")]
        );
        assert_eq!(c.products[0].subscriptions[0].max_connections, Some(3));
        assert_eq!(c.apis[0].subscription_key.header, "x-key");
        assert_eq!(c.apis[0].subscription_key.query, "subscription-key");
        // Debug output (e.g. in a panic) never shows key material.
        assert!(!format!("{:?}", c.products[0]).contains(&hex(&key_digest("0123456789abcdef0123"))));
    }
}
