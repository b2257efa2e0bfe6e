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
//!   gateway started on the `tollgate.toml` symlink, as in a pod.
//!
//! The validator is kubernetes-validate from PyPI, installed by `scripts/test` into
//! `target/k8s` (a virtualenv; its schemas are bundled, nothing is fetched). Its PyYAML
//! dependency parses the YAML for these tests too, so no YAML crate is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy").join("kubernetes")
}

/// A program of the kubernetes-validate virtualenv; a failure (never a skip) if it is missing.
fn venv_bin(name: &str) -> PathBuf {
    let bin = repo().join("target").join("k8s").join("bin").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run ./scripts/test once (it installs kubernetes-validate 1.37.0 from PyPI \
         into target/k8s)",
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

    let documents: usize = resources.iter().map(|f| yaml_docs(f).len()).sum();
    let mut cmd = Command::new(venv_bin("kubernetes-validate"));
    cmd.arg("--strict");
    for v in KUBERNETES_VERSIONS {
        cmd.args(["--kubernetes-version", v]);
    }
    let out = cmd.args(&resources).output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{report}"
    );
    let lines: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    let passed = lines
        .iter()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    assert!(
        lines.iter().all(|l| l.starts_with("INFO ")),
        "every line should say passed:\n{report}"
    );
    assert_eq!(
        passed,
        documents * KUBERNETES_VERSIONS.len(),
        "one pass per object and version:\n{report}"
    );
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
/// `..data`. Writes `text` as `tollgate.toml` in a new timestamped directory, then swaps
/// `..data` over to it atomically (a `..data_tmp` link renamed over it) and removes the
/// previous directory.
fn kubelet_writes(volume: &Path, text: &str, stamp: &str) {
    let previous = std::fs::read_link(volume.join("..data")).ok();
    let ts = format!("..2026_12_07_05_{stamp}");
    std::fs::create_dir(volume.join(&ts)).unwrap();
    std::fs::write(volume.join(&ts).join("tollgate.toml"), text).unwrap();
    let user_visible = volume.join("tollgate.toml");
    if std::fs::symlink_metadata(&user_visible).is_err() {
        std::os::unix::fs::symlink("..data/tollgate.toml", &user_visible).unwrap();
    }
    std::os::unix::fs::symlink(&ts, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    if let Some(previous) = previous {
        std::fs::remove_dir_all(volume.join(previous)).unwrap();
    }
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
    kubelet_writes(dir.path(), &v1, "00_00.000000001");
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

    kubelet_writes(gw.dir.path(), &v2, "01_00.000000002");
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
