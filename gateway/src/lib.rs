//! Tollgate: a WebSocket API gateway.
//!
//! A client's opening handshake goes through the [`handshake`] pipeline (route, validate,
//! subscribe, admit, the onHandshake [`policy`] chain, backend handshake); only when the backend
//! has answered 101 does the client get its 101, and then the [`relay`] moves frames both ways
//! until either side closes. The [`manifest`] describes what is served, [`served`] builds it,
//! [`server`] runs it; [`admin`] and [`reload`] see only the narrow views they need.
//!
//! Public: what the binary (`main.rs`) and the bench use. Everything else is the crate's own.

mod admin;
mod backend;
pub mod cluster;
pub mod console;
pub mod counters;
pub mod descriptors;
mod handover;
mod handshake;
mod http1;
pub mod logging;
mod memory;
pub mod metrics;
pub mod notify;
pub mod policy;
mod relay;
pub mod reload;
mod routes;
mod served;
pub mod server;
mod sliding_window;
mod stream;
mod subscriptions;
pub mod upgrade;
mod watch;
mod wskey;

/// How the gateway turns an API's manifest attachments into the policy host's specs (the bench
/// builds its chains the same way).
pub use served::attachments;

/// The frame parser lives in `tollgate-edge` (no wasm engine, so it can be fuzzed); the relay
/// and metrics keep using it as `crate::frame`.
pub use tollgate_edge::frame;
/// The manifest's parser and validated types live in `tollgate-manifest` (no wasm engine, so it
/// can be fuzzed).
pub use tollgate_manifest as manifest;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The modules each module names (`crate::x`, `use crate::{x, y}`), from the sources.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        let mut graph = BTreeMap::new();
        for f in files {
            let rel = f.strip_prefix(&src).unwrap();
            // A module is its top-level name: `policy/chain.rs` belongs to `policy`.
            let module = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            // Doc comments may link anywhere; only code counts.
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let named: &mut BTreeSet<String> = graph.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let idents: Vec<&str> = match rest.strip_prefix('{') {
                    Some(group) => group
                        .split('}')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(|s| s.trim().split("::").next().unwrap_or(""))
                        .collect(),
                    None => vec![rest
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or("")],
                };
                for m in idents {
                    if !m.is_empty() && m != module && m != "frame" && m != "manifest" {
                        named.insert(m.to_owned());
                    }
                }
            }
        }
        graph
    }

    /// The modules form no cycle: each can be read (and changed) knowing only those below it.
    #[test]
    fn modules_import_each_other_without_cycles() {
        let graph = imports();
        assert!(graph.contains_key("server") && graph.contains_key("policy"));
        // Depth-first search with colours; a grey module met again closes a cycle.
        fn visit<'a>(
            m: &'a str,
            graph: &'a BTreeMap<String, BTreeSet<String>>,
            grey: &mut Vec<&'a str>,
            black: &mut BTreeSet<&'a str>,
        ) {
            if black.contains(m) {
                return;
            }
            if let Some(at) = grey.iter().position(|g| *g == m) {
                panic!("import cycle: {} -> {m}", grey[at..].join(" -> "));
            }
            grey.push(m);
            for n in graph.get(m).into_iter().flatten() {
                visit(n, graph, grey, black);
            }
            grey.pop();
            black.insert(m);
        }
        let mut black = BTreeSet::new();
        for m in graph.keys() {
            visit(m, &graph, &mut Vec::new(), &mut black);
        }
        // The narrow views hold: the admin listener, the console and the reload watcher never
        // reach for the running gateway itself.
        for m in ["admin", "console", "reload", "handshake", "served"] {
            assert!(
                !graph[m].contains("server"),
                "{m} imports server: {:?}",
                graph[m]
            );
        }
    }
}
