//! Policy attachments (`[[policies]]`, `[[products.policies]]`, `[[apis.on_handshake]]`): the
//! plugin they name, its budgets, failure status, instance strategy and sandbox grants.
//!
//! Its own file because the three scopes share these rules, and because the grants are where the
//! sandbox's boundary is decided: a `read_dirs` entry must stay below the manifest's directory,
//! symbolic links included.

use std::path::Path;

use toml::Spanned;

use super::Validator;
use crate::model::{
    Attachment, Grants, Instances, MessageAttachment, DEFAULT_MAX_INSPECTED_MESSAGE_SIZE,
    DEFAULT_POOL_MAX_USES, MAX_INSPECTED_MESSAGE_SIZE,
};
use crate::raw::{RawApi, RawAttachment};

impl Validator<'_> {
    /// A per-call budget written as a duration (`timeout`, `cpu_time`): more than zero.
    fn call_duration(&mut self, t: &Spanned<String>, key: String) -> Option<std::time::Duration> {
        match humantime_serde::re::humantime::parse_duration(t.get_ref().trim()) {
            Ok(d) if d.is_zero() => {
                self.err(t.span(), key, "must be more than 0");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.err(
                    t.span(),
                    key,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"500ms\" or \"2s\"",
                        t.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// The attachments `list` at `key` (`policies`, `products[i].policies` or
    /// `apis[i].on_handshake`). The plugins they name are only looked up when the gateway loads
    /// them; here each gets its location, for the errors found then.
    pub(super) fn attachments(
        &mut self,
        list: &[Spanned<RawAttachment>],
        key: &str,
    ) -> Vec<Attachment> {
        for (n, a) in list.iter().enumerate() {
            if let Some(d) = &a.get_ref().direction {
                self.err(
                    d.span(),
                    format!("{key}[{n}].direction"),
                    "only applies to message policies ([[apis.on_message]]); a handshake policy sees the handshake",
                );
            }
        }
        self.attachment_list(list, key)
    }

    /// API `i`'s `[[apis.on_message]]`: attachments like the others, plus whose messages each
    /// sees; a failing message policy closes its connection, so `failure_status` has no use.
    pub(super) fn message_attachments(&mut self, i: usize, a: &RawApi) -> Vec<MessageAttachment> {
        let key = format!("apis[{i}].on_message");
        let mut sides = Vec::new();
        for (n, m) in a.on_message.iter().enumerate() {
            let r = m.get_ref();
            if let Some(f) = &r.failure_status {
                self.err(
                    f.span(),
                    format!("{key}[{n}].failure_status"),
                    "does not apply to a message policy: one that fails closes its connection (1011)",
                );
            }
            sides.push(match r.direction.as_ref().map(|d| (d.get_ref().trim(), d)) {
                None | Some(("both", _)) => (true, true),
                Some(("client", _)) => (true, false),
                Some(("backend", _)) => (false, true),
                Some((other, d)) => {
                    self.err(
                        d.span(),
                        format!("{key}[{n}].direction"),
                        format!("`{other}` is not a direction: write \"client\" (the client's messages), \"backend\" or \"both\" (the default)"),
                    );
                    (true, true)
                }
            });
        }
        self.attachment_list(&a.on_message, &key)
            .into_iter()
            .zip(sides)
            .map(|(attachment, (client, backend))| MessageAttachment {
                attachment,
                client,
                backend,
            })
            .collect()
    }

    /// API `i`'s `limits.max_inspected_message_size`: 1 byte to 64 MiB.
    pub(super) fn max_inspected(&mut self, i: usize, a: &RawApi) -> u64 {
        match &a.limits.max_inspected_message_size {
            None => DEFAULT_MAX_INSPECTED_MESSAGE_SIZE,
            Some(m) if (1..=MAX_INSPECTED_MESSAGE_SIZE).contains(m.get_ref()) => *m.get_ref(),
            Some(m) => {
                self.err(
                    m.span(),
                    format!("apis[{i}].limits.max_inspected_message_size"),
                    format!("must be between 1 and {MAX_INSPECTED_MESSAGE_SIZE} (64 MiB): a message being inspected is held in memory whole"),
                );
                DEFAULT_MAX_INSPECTED_MESSAGE_SIZE
            }
        }
    }

    fn attachment_list(&mut self, list: &[Spanned<RawAttachment>], key: &str) -> Vec<Attachment> {
        let mut out = Vec::new();
        for (n, a) in list.iter().enumerate() {
            let r = a.get_ref();
            let failure_status = r.failure_status.as_ref().map_or(500, |f| *f.get_ref());
            if let Some(f) = r
                .failure_status
                .as_ref()
                .filter(|_| !(400..=599).contains(&failure_status))
            {
                self.err(
                    f.span(),
                    format!("{key}[{n}].failure_status"),
                    "must be between 400 and 599",
                );
            }
            if r.plugin.get_ref().trim().is_empty() {
                self.err(
                    r.plugin.span(),
                    format!("{key}[{n}].plugin"),
                    "must name a plugin",
                );
            }
            let timeout = r
                .timeout
                .as_ref()
                .and_then(|t| self.call_duration(t, format!("{key}[{n}].timeout")));
            let cpu_time = r
                .cpu_time
                .as_ref()
                .and_then(|t| self.call_duration(t, format!("{key}[{n}].cpu_time")));
            if let Some(f) = &r.fuel {
                self.err(
                    f.span(),
                    format!("{key}[{n}].fuel"),
                    "is no longer read: a call's CPU budget is time now, `cpu_time` (e.g. \"50ms\", the default); remove `fuel`",
                );
            }
            let mut grants = Grants {
                read_dirs: Vec::new(),
                env: r.grants.env.clone(),
                clock: r.grants.clock,
            };
            for (k, entry) in r.grants.read_dirs.iter().enumerate() {
                let d = entry.get_ref();
                let rel = d.trim_end_matches('/');
                let host = self.resolve(rel);
                let site = format!("{key}[{n}].grants.read_dirs[{k}]");
                if rel.is_empty()
                    || Path::new(rel).is_absolute()
                    || rel.split('/').any(|c| c == "..")
                {
                    self.err(
                        entry.span(),
                        site,
                        format!("`{d}` must be a relative path below the manifest's directory"),
                    );
                } else if !host.is_dir() {
                    self.err(
                        entry.span(),
                        site,
                        format!("`{}` is not a directory", host.display()),
                    );
                } else if !self.stays_below_manifest_dir(&host) {
                    // A symbolic link (the directory or one on its way) that leads out: the
                    // sandbox would open whatever it points at.
                    self.err(
                        entry.span(),
                        site,
                        format!("`{d}` leads outside the manifest's directory (through a symbolic link); grant the real directory below it instead"),
                    );
                } else {
                    grants.read_dirs.push((host, rel.to_owned()));
                }
            }
            let instances = match (
                r.instances.as_ref().map(|i| i.get_ref().as_str()),
                r.pool_max_uses.as_ref().map(|u| *u.get_ref()),
            ) {
                (None | Some("fresh"), None) => Instances::Fresh,
                (Some("pooled"), uses) if uses != Some(0) => Instances::Pooled {
                    max_uses: uses.unwrap_or(DEFAULT_POOL_MAX_USES),
                },
                (Some("pooled"), _) => {
                    self.err(
                        r.pool_max_uses.as_ref().map_or(a.span(), |u| u.span()),
                        format!("{key}[{n}].pool_max_uses"),
                        "must be at least 1",
                    );
                    Instances::Fresh
                }
                (None | Some("fresh"), Some(_)) => {
                    self.err(
                        r.pool_max_uses.as_ref().map_or(a.span(), |u| u.span()),
                        format!("{key}[{n}].pool_max_uses"),
                        "only applies with instances = \"pooled\"",
                    );
                    Instances::Fresh
                }
                (Some(other), _) => {
                    self.err(
                        r.instances.as_ref().map_or(a.span(), |i| i.span()),
                        format!("{key}[{n}].instances"),
                        format!("`{other}` is not an instance strategy; use \"fresh\" (a new instance per handshake, the default) or \"pooled\" (warm instances reused)"),
                    );
                    Instances::Fresh
                }
            };
            out.push(Attachment {
                plugin: r.plugin.get_ref().clone(),
                config: r
                    .config
                    .as_ref()
                    .map(|c| c.get_ref().clone())
                    .unwrap_or_default(),
                cpu_time,
                memory_limit_bytes: r.memory_limit_bytes,
                timeout,
                failure_status,
                grants,
                instances,
                location: self.site(r.plugin.span().start, &format!("{key}[{n}].plugin")),
                config_location: match &r.config {
                    Some(c) => self.site(c.span().start, &format!("{key}[{n}].config")),
                    None => self.site(r.plugin.span().start, &format!("{key}[{n}].plugin")),
                },
            });
        }
        self.has_policies |= !out.is_empty();
        out
    }

    /// Whether `dir` (an existing directory below the manifest's, by name) is still below it
    /// once every symbolic link on the way is followed.
    fn stays_below_manifest_dir(&self, dir: &Path) -> bool {
        match (self.base.canonicalize(), dir.canonicalize()) {
            (Ok(base), Ok(real)) => real.starts_with(base),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::test_util::{p, BASE};

    #[test]
    fn attachment_timeout_is_a_positive_duration_located_by_line_and_key() {
        let api = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n";
        let att = |t: &str| {
            format!("{BASE}plugin_dir = \".\"\n{api}[[apis.on_handshake]]\nplugin = \"p\"\n{t}\n")
        };
        let c = p(&att("timeout = \"500ms\"")).unwrap();
        assert_eq!(
            c.apis[0].on_handshake[0].timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(p(&att("")).unwrap().apis[0].on_handshake[0].timeout, None);
        for (bad, words) in [
            ("timeout = \"soon\"", "is not a duration"),
            ("timeout = \"0s\"", "must be more than 0"),
        ] {
            let e = p(&att(bad)).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].key, "apis[0].on_handshake[0].timeout", "{e}");
            assert_eq!(e.0[0].line, 11, "{e}");
            assert!(e.0[0].message.contains(words), "{e}");
        }
        let e = p(&att("timeout = 5")).unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
    }

    fn attached(t: &str) -> String {
        let api = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n";
        format!("{BASE}plugin_dir = \".\"\n{api}[[apis.on_handshake]]\nplugin = \"p\"\n{t}\n")
    }

    #[test]
    fn cpu_time_is_a_positive_duration() {
        let c = p(&attached("cpu_time = \"20ms\"")).unwrap();
        assert_eq!(
            c.apis[0].on_handshake[0].cpu_time,
            Some(Duration::from_millis(20))
        );
        assert_eq!(
            p(&attached("")).unwrap().apis[0].on_handshake[0].cpu_time,
            None
        );
        for bad in ["cpu_time = \"0ms\"", "cpu_time = \"lots\""] {
            let e = p(&attached(bad)).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].key, "apis[0].on_handshake[0].cpu_time", "{e}");
            assert_eq!(e.0[0].line, 11, "{e}");
        }
    }

    /// `fuel` counted wasm instructions until CPU time was counted by epochs: a manifest that
    /// still sets it is told what replaced it, rather than silently getting another budget.
    #[test]
    fn fuel_is_refused_with_a_pointer_to_cpu_time() {
        let e = p(&attached("fuel = 50000000")).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].key, "apis[0].on_handshake[0].fuel", "{e}");
        assert_eq!(e.0[0].line, 11, "{e}");
        assert!(e.0[0].message.contains("`cpu_time`"), "{e}");
    }

    fn on_message(t: &str) -> String {
        let api = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n";
        format!("{BASE}plugin_dir = \".\"\n{api}{t}")
    }

    #[test]
    fn message_policies_watch_both_directions_unless_told() {
        let c = p(&on_message(
            "[[apis.on_message]]\nplugin = \"m\"\n[[apis.on_message]]\nplugin = \"n\"\ndirection = \"backend\"\ninstances = \"pooled\"\n",
        ))
        .unwrap();
        let m = &c.apis[0].on_message;
        assert_eq!((m[0].client, m[0].backend), (true, true));
        assert_eq!((m[1].client, m[1].backend), (false, true));
        assert_eq!(m[1].attachment.plugin, "n");
        assert_eq!(
            c.apis[0].limits.max_inspected_message_size,
            crate::DEFAULT_MAX_INSPECTED_MESSAGE_SIZE
        );
        let c = p(&on_message(
            "[apis.limits]\nmax_inspected_message_size = 4096\n[[apis.on_message]]\nplugin = \"m\"\ndirection = \"client\"\n",
        ))
        .unwrap();
        assert_eq!(c.apis[0].limits.max_inspected_message_size, 4096);
        assert_eq!(
            (
                c.apis[0].on_message[0].client,
                c.apis[0].on_message[0].backend
            ),
            (true, false)
        );
    }

    #[test]
    fn each_message_policy_mistake_names_its_key() {
        for (text, key, words) in [
            (
                "[[apis.on_message]]\nplugin = \"m\"\ndirection = \"up\"\n",
                "apis[0].on_message[0].direction",
                "is not a direction",
            ),
            (
                "[[apis.on_message]]\nplugin = \"m\"\nfailure_status = 503\n",
                "apis[0].on_message[0].failure_status",
                "closes its connection (1011)",
            ),
            (
                "[[apis.on_handshake]]\nplugin = \"m\"\ndirection = \"client\"\n",
                "apis[0].on_handshake[0].direction",
                "only applies to message policies",
            ),
            (
                "[apis.limits]\nmax_inspected_message_size = 0\n",
                "apis[0].limits.max_inspected_message_size",
                "must be between 1 and",
            ),
            (
                "[apis.limits]\nmax_inspected_message_size = 67108865\n",
                "apis[0].limits.max_inspected_message_size",
                "must be between 1 and",
            ),
        ] {
            let e = p(&on_message(text)).unwrap_err();
            assert_eq!(e.0.len(), 1, "{e}");
            assert_eq!(e.0[0].key, key, "{e}");
            assert!(e.0[0].message.contains(words), "{e}");
        }
    }
}
