//! What the unit tests of every module share: a manifest parsed at a fixed path, its smallest
//! valid `[gateway]`, and digests shown as `sha256sum` prints them.

use std::path::Path;

use crate::{parse, Config, KeyDigest, ManifestErrors};

pub(crate) fn p(text: &str) -> Result<Config, ManifestErrors> {
    parse(Path::new("/tmp/m.toml"), text)
}

pub(crate) const BASE: &str = "[gateway]\nname = \"edge-1\"\nlisten = \"127.0.0.1:0\"\n";

pub(crate) fn hex(d: &KeyDigest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
