//! The host side of the policy world's imports: the per-call [`HostState`] (WASI context,
//! resource table, limits, the call's request and prepared config) and the functions behind
//! `log`, `signatures`, `config` and the `request` resource. Every one of them is bounded
//! (CPU time, byte budgets, rate limits) and checks the capability it needs.

use super::*;

/// A host call refused because the plugin did not declare what it needs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refused {
    pub(super) capability: Capability,
    pub(super) action: &'static str,
}

/// Per-call host state: the WASI context (empty), the resource table and the limits.
pub struct HostState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: StoreLimits,
    pub(super) plugin: Arc<str>,
    /// Shared by every plugin of this host: signatures already found valid.
    pub(super) verified: Arc<VerifyCache>,
    /// This plugin's `tollgate_signature_verifications_total`; set for handshake calls only,
    /// so the key probes a plugin makes in `configure` are not counted.
    pub(super) signature_metrics: Option<Arc<PluginSignatureMetrics>>,
    /// What the plugin declared (nothing while it is being asked to `declare`).
    pub(super) declared: Arc<[Capability]>,
    /// The attachment's prepared config (`config.prepared`); none in load-time calls.
    pub(super) prepared: Option<Arc<str>>,
    /// The request of the `on-handshake` call in progress.
    pub(super) request: Option<Request>,
    /// Bytes the current call has read from the request.
    pub(super) read_bytes: usize,
    /// `log` calls in the current call (reset by each call).
    pub(super) logs: u32,
    /// Set when a host call was refused for a capability the plugin did not declare; the call
    /// then traps, and this names why.
    pub(super) refused: Option<Refused>,
    /// The process's key sets, for `key-sets.register`.
    pub(super) key_set_registry: Arc<KeySets>,
    /// During `configure`: what `key-sets.register` may fetch, and what it registered.
    pub(super) registering: Option<Registering>,
    /// When the `on-handshake` call in progress must be done (its `timeout`): a wait for a
    /// key-set refetch ends before it, so the token is judged rather than the call timed out.
    pub(super) deadline: Option<std::time::Instant>,
    /// Epoch ticks the call in progress may cross while running (its `cpu_time`), and those
    /// it has crossed.
    pub(super) cpu_ticks_budget: u32,
    pub(super) cpu_ticks_used: u32,
    /// The key sets of the attachment this instance serves (handshake calls).
    pub(super) key_sets: Arc<[Arc<KeySet>]>,
    /// The process's counters, for `counters.increment`.
    pub(super) counters: Arc<crate::counters::Counters>,
    /// `counters.increment` calls in the current call.
    pub(super) counter_calls: u32,
}

/// A `configure` call's registrations.
#[derive(Default)]
pub(super) struct Registering {
    /// Every string value of the attachment's config: a plugin may only have the gateway fetch
    /// a URL the operator wrote there (no network of its own choosing).
    config_strings: std::collections::HashSet<String>,
    /// The sets registered, by handle.
    pub(super) sets: Vec<Arc<KeySet>>,
    /// Calls so far, failed ones included.
    attempts: usize,
}

impl Registering {
    pub(super) fn new(config_json: &str) -> Registering {
        fn strings(v: &serde_json::Value, out: &mut std::collections::HashSet<String>) {
            match v {
                serde_json::Value::String(s) => {
                    out.insert(s.clone());
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
                serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
                _ => {}
            }
        }
        let mut config_strings = std::collections::HashSet::new();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(config_json) {
            strings(&v, &mut config_strings);
        }
        Registering {
            config_strings,
            ..Registering::default()
        }
    }
}

impl HostState {
    /// Readies a (possibly warm) store for the next call.
    pub(super) fn start_call(&mut self) {
        self.logs = 0;
        self.read_bytes = 0;
        self.counter_calls = 0;
        self.refused = None;
    }

    /// Refuses (the call traps) what needs a capability the plugin did not declare.
    fn need(&mut self, capability: Capability, action: &'static str) -> wasmtime::Result<()> {
        if self.declared.contains(&capability) {
            return Ok(());
        }
        self.refused = Some(Refused { capability, action });
        Err(wasmtime::Error::msg(format!(
            "{action} refused: the plugin does not declare `{capability}`"
        )))
    }

    /// The request of the call in progress, for a read that needs `capability` (`None`: one
    /// that needs none). Every read costs [`READ_FLAT_BYTES`] of the call's read budget besides
    /// what it returns, so a loop of tiny reads is bounded too.
    fn read_as(
        &mut self,
        capability: Option<Capability>,
        action: &'static str,
    ) -> wasmtime::Result<&Request> {
        if let Some(c) = capability {
            self.need(c, action)?;
        }
        self.charge_read(READ_FLAT_BYTES)?;
        self.request
            .as_ref()
            .ok_or_else(|| wasmtime::Error::msg("the request is only readable in on-handshake"))
    }

    fn read(&mut self, capability: Capability, action: &'static str) -> wasmtime::Result<&Request> {
        self.read_as(Some(capability), action)
    }

    /// Counts `bytes` read against [`MAX_READ_BYTES_PER_CALL`]; beyond it the call traps.
    fn charge_read(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.read_bytes = self.read_bytes.saturating_add(bytes);
        if self.read_bytes > MAX_READ_BYTES_PER_CALL {
            return Err(wasmtime::Error::msg(format!(
                "read more than {MAX_READ_BYTES_PER_CALL} bytes of the request in one call"
            )));
        }
        Ok(())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit_types::Host for HostState {}
impl wit::Host for HostState {}

impl bindings::tollgate::policy::config::Host for HostState {
    fn prepared(&mut self) -> wasmtime::Result<String> {
        let p = self.prepared.clone().ok_or_else(|| {
            wasmtime::Error::msg("config.prepared is only available in on-handshake")
        })?;
        // A flat cost only: its size was bounded at load (`MAX_PREPARED_BYTES`), and an
        // instance reads it once; counting its bytes would let a large but valid config eat
        // the request's budget.
        self.charge_read(READ_FLAT_BYTES)?;
        Ok(p.to_string())
    }
}

fn pairs(v: &[(String, String)]) -> Vec<wit_types::Pair> {
    v.iter()
        .map(|(name, value)| wit_types::Pair {
            name: name.clone(),
            value: value.clone(),
        })
        .collect()
}

fn pairs_len(v: &[wit_types::Pair]) -> usize {
    v.iter().map(|p| p.name.len() + p.value.len()).sum()
}

/// The request resource: every read checks the capability it needs and counts its bytes.
impl wit::HostRequest for HostState {
    fn method(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<String> {
        let m = self
            .read(Capability::ReadRequest, "read the request's method")?
            .method
            .to_string();
        Ok(m)
    }

    fn path(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<String> {
        let p = self
            .read(Capability::ReadRequest, "read the request's path")?
            .path
            .clone();
        self.charge_read(p.len())?;
        Ok(p)
    }

    fn header(
        &mut self,
        _: Resource<request::RequestHandle>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        let v = self
            .read(Capability::ReadRequest, "read a request header")?
            .header(&name);
        self.charge_read(name.len() + v.as_ref().map_or(0, String::len))?;
        Ok(v)
    }

    fn header_values(
        &mut self,
        _: Resource<request::RequestHandle>,
        name: String,
    ) -> wasmtime::Result<Vec<String>> {
        let v = self
            .read(Capability::ReadRequest, "read a request header")?
            .header_values(&name);
        self.charge_read(name.len() + v.iter().map(String::len).sum::<usize>())?;
        Ok(v)
    }

    fn headers(
        &mut self,
        _: Resource<request::RequestHandle>,
    ) -> wasmtime::Result<Vec<wit_types::Pair>> {
        let v: Vec<wit_types::Pair> = self
            .read(Capability::ReadRequest, "read the request headers")?
            .header_pairs()
            .map(|(name, value)| wit_types::Pair { name, value })
            .collect();
        self.charge_read(pairs_len(&v))?;
        Ok(v)
    }

    fn query(
        &mut self,
        _: Resource<request::RequestHandle>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        let v = self
            .read(Capability::ReadRequest, "read the request's query")?
            .query
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone());
        self.charge_read(name.len() + v.as_ref().map_or(0, String::len))?;
        Ok(v)
    }

    fn query_pairs(
        &mut self,
        _: Resource<request::RequestHandle>,
    ) -> wasmtime::Result<Vec<wit_types::Pair>> {
        let v = pairs(
            &self
                .read(Capability::ReadRequest, "read the request's query")?
                .query,
        );
        self.charge_read(pairs_len(&v))?;
        Ok(v)
    }

    fn client_address(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<String> {
        Ok(self
            .read(Capability::ReadRequest, "read the client's address")?
            .client
            .to_string())
    }

    fn client_ip(
        &mut self,
        _: Resource<request::RequestHandle>,
    ) -> wasmtime::Result<Option<String>> {
        Ok(self
            .read(Capability::ReadRequest, "read the client's IP")?
            .client_ip
            .map(|ip| ip.to_string()))
    }

    fn tls(
        &mut self,
        _: Resource<request::RequestHandle>,
    ) -> wasmtime::Result<Option<wit_types::TlsInfo>> {
        let t = self
            .read(Capability::ReadRequest, "read the client's TLS facts")?
            .tls
            .as_deref()
            .map(|t| wit_types::TlsInfo {
                version: t.version.clone(),
                cipher_suite: t.cipher_suite.clone(),
                server_name: t.server_name.clone(),
            });
        Ok(t)
    }

    fn api(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<String> {
        Ok(self.read_as(None, "read the API's name")?.api.to_string())
    }

    fn product(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.read_as(None, "read the product")?.product.clone())
    }

    fn context(
        &mut self,
        _: Resource<request::RequestHandle>,
        name: String,
    ) -> wasmtime::Result<Option<String>> {
        let v = self
            .read(Capability::UseContext, "read a context value")?
            .context
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone());
        self.charge_read(name.len() + v.as_ref().map_or(0, String::len))?;
        Ok(v)
    }

    fn context_values(
        &mut self,
        _: Resource<request::RequestHandle>,
    ) -> wasmtime::Result<Vec<wit_types::Pair>> {
        let v = pairs(
            &self
                .read(Capability::UseContext, "read the context values")?
                .context,
        );
        self.charge_read(pairs_len(&v))?;
        Ok(v)
    }

    fn received_at(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<u64> {
        Ok(self.read_as(None, "read received-at")?.received_at)
    }

    /// The guest only ever borrows the request; nothing to free.
    fn drop(&mut self, _: Resource<request::RequestHandle>) -> wasmtime::Result<()> {
        Ok(())
    }
}

type LogLevel = bindings::tollgate::policy::log::Level;
type SigAlgorithm = bindings::tollgate::policy::signatures::Algorithm;
type SigKey = bindings::tollgate::policy::signatures::Key;

/// After a host call waited (a fetch, a store round trip): the ticks that passed meanwhile were
/// not the call's CPU time, so its epoch deadline starts afresh from now. (Without this the
/// guest's next epoch check would charge one tick per wait that crossed a tick boundary.)
fn waited(store: &mut StoreContextMut<'_, HostState>) {
    store.set_epoch_deadline(1);
}

/// `message` cut to at most `max` bytes on a character boundary, saying how much was cut.
pub(super) fn truncated(message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes cut]", &message[..end], message.len() - end)
}

/// `tollgate:policy/log.log`: truncated, and at most [`MAX_LOGS_PER_CALL`] records per
/// call (then one note, then nothing), so a plugin cannot flood the gateway's log.
fn host_log(
    mut store: StoreContextMut<'_, HostState>,
    (level, message): (LogLevel, String),
) -> wasmtime::Result<()> {
    let state = store.data_mut();
    state.logs = state.logs.saturating_add(1);
    let plugin = &*state.plugin;
    if state.logs > MAX_LOGS_PER_CALL {
        if state.logs == MAX_LOGS_PER_CALL + 1 {
            tracing::warn!(event = "policy_log", plugin, suppressed = true,
                "further log records of this call suppressed (at most {MAX_LOGS_PER_CALL} per call)");
        }
        return Ok(());
    }
    let message = truncated(message, MAX_LOG_MESSAGE_BYTES);
    match level {
        LogLevel::Debug => tracing::debug!(event = "policy_log", plugin, "{message}"),
        LogLevel::Info => tracing::info!(event = "policy_log", plugin, "{message}"),
        LogLevel::Warn => tracing::warn!(event = "policy_log", plugin, "{message}"),
        LogLevel::Error => tracing::error!(event = "policy_log", plugin, "{message}"),
    }
    Ok(())
}

/// `tollgate:policy/signatures.verify`: refused (the call traps) unless the plugin declared
/// `verify-signatures`; inputs beyond the caps get an error back instead of being processed.
/// Its work counts against the call's CPU time like the guest's own (a guest calling it in a
/// loop crosses epoch ticks), so it needs no fee of its own.
fn host_verify(
    mut store: StoreContextMut<'_, HostState>,
    (alg, key, message, signature): (SigAlgorithm, SigKey, Vec<u8>, Vec<u8>),
) -> wasmtime::Result<(Result<bool, String>,)> {
    store
        .data_mut()
        .need(Capability::VerifySignatures, "called signatures.verify")?;
    let key_bytes = match &key {
        SigKey::Spki(d) | SigKey::Raw(d) | SigKey::Secret(d) => d.len(),
        SigKey::Rsa(r) => r.n.len().saturating_add(r.e.len()),
    };
    for (what, got, max) in [
        ("message", message.len(), MAX_VERIFY_MESSAGE_BYTES),
        ("key", key_bytes, MAX_VERIFY_KEY_BYTES),
        ("signature", signature.len(), MAX_VERIFY_SIGNATURE_BYTES),
    ] {
        if got > max {
            return Ok((Err(format!(
                "{what} of {got} bytes is larger than signatures.verify accepts ({max} bytes)"
            )),));
        }
    }
    let state = store.data();
    let verified = verify(
        &state.verified,
        state.signature_metrics.as_deref(),
        alg,
        key,
        &message,
        &signature,
    );
    Ok((verified,))
}

/// Verifies through the cache of valid signatures, and counts the outcome in the plugin's
/// `tollgate_signature_verifications_total` when it has one (handshake calls only).
fn verify(
    cache: &VerifyCache,
    metrics: Option<&PluginSignatureMetrics>,
    alg: SigAlgorithm,
    key: SigKey,
    message: &[u8],
    signature: &[u8],
) -> Result<bool, String> {
    use tollgate_verify::Key;
    use SigKey as K;
    let Some(alg) = algorithm(alg) else {
        return Err("unknown algorithm".into());
    };
    let key = match key {
        K::Spki(d) => Key::Spki(d),
        K::Rsa(r) => Key::Rsa { n: r.n, e: r.e },
        K::Raw(r) => Key::Raw(r),
        K::Secret(s) => Key::Secret(s),
    };
    verify_key(cache, metrics, alg, &key, message, signature)
}

/// The host's algorithm for the generated one (which follows the WIT's order, as
/// `WIT_ORDER` does).
fn algorithm(alg: SigAlgorithm) -> Option<tollgate_verify::Algorithm> {
    tollgate_verify::Algorithm::from_wit_position(alg as usize)
}

fn verify_key(
    cache: &VerifyCache,
    metrics: Option<&PluginSignatureMetrics>,
    alg: tollgate_verify::Algorithm,
    key: &tollgate_verify::Key,
    message: &[u8],
    signature: &[u8],
) -> Result<bool, String> {
    let result = cache.verify(alg, key, message, signature, || {
        tollgate_verify::verify(alg, key, message, signature)
    });
    if let Some(m) = metrics {
        m.record(alg, VerifyResult::of(&result));
    }
    result
}

type KsSource = bindings::tollgate::policy::key_sets::Source;
type KsOptions = bindings::tollgate::policy::key_sets::Options;
type KsVerification = bindings::tollgate::policy::key_sets::Verification;

/// Largest `ca-pem` `key-sets.register` accepts.
const MAX_CA_PEM_BYTES: usize = 256 * 1024;

/// Longest `kid` `key-sets.verify` accepts (longer ones are kept out of fetched sets too).
pub const MAX_KID_BYTES: usize = tollgate_verify::jwks::MAX_KID_BYTES;

/// `tollgate:policy/key-sets.register`: `configure` only, needs `fetch-keys`, at most
/// [`key_sets::MAX_SETS_PER_ATTACHMENT`] calls (failed ones count), and only for a URL that is
/// a value of the attachment's config; fetches the set (or finds it already held) before
/// answering, within the load call's deadline.
fn host_key_set_register(
    mut store: StoreContextMut<'_, HostState>,
    (source, options): (KsSource, KsOptions),
) -> Box<dyn std::future::Future<Output = wasmtime::Result<(Result<u32, String>,)>> + Send + '_> {
    Box::new(async move {
        store
            .data_mut()
            .need(Capability::FetchKeys, "called key-sets.register")?;
        let state = store.data_mut();
        let Some(registering) = state.registering.as_mut() else {
            return Err(wasmtime::Error::msg(
                "key-sets.register is only available in configure",
            ));
        };
        registering.attempts += 1;
        if registering.attempts > key_sets::MAX_SETS_PER_ATTACHMENT {
            return Ok((Err(format!(
                "at most {} key-sets.register calls per attachment",
                key_sets::MAX_SETS_PER_ATTACHMENT
            )),));
        }
        let (KsSource::OpenidConfiguration(url) | KsSource::Jwks(url)) = &source;
        if !registering.config_strings.contains(url) {
            return Ok((Err(
                "key-sets.register: the URL is not a value of this attachment's config (the gateway fetches only URLs the operator wrote there)".into(),
            ),));
        }
        let source = match &source {
            KsSource::OpenidConfiguration(u) => {
                key_sets::parse_url(u).map(key_sets::Source::OpenidConfiguration)
            }
            KsSource::Jwks(u) => key_sets::parse_url(u).map(key_sets::Source::Jwks),
        };
        let source = match source {
            Ok(s) => s,
            Err(e) => return Ok((Err(e),)),
        };
        if options
            .ca_pem
            .as_ref()
            .is_some_and(|p| p.len() > MAX_CA_PEM_BYTES)
        {
            return Ok((Err(format!(
                "CA certificates: more than {MAX_CA_PEM_BYTES} bytes"
            )),));
        }
        let options = match key_sets::Options::new(
            options.refresh_seconds,
            options.min_refresh_seconds,
            options.ca_pem.as_deref(),
        ) {
            Ok(o) => o,
            Err(e) => return Ok((Err(e),)),
        };
        let registry = state.key_set_registry.clone();
        let registered = registry.register(source, options).await;
        waited(&mut store);
        let set = match registered {
            Ok(set) => set,
            Err(e) => return Ok((Err(e),)),
        };
        let state = store.data_mut();
        let Some(registering) = state.registering.as_mut().map(|r| &mut r.sets) else {
            return Err(wasmtime::Error::msg(
                "key-sets.register is only available in configure",
            ));
        };
        // Registering the same set twice gives the same handle.
        let handle = match registering.iter().position(|s| Arc::ptr_eq(s, &set)) {
            Some(i) => i,
            None => {
                registering.push(set);
                registering.len() - 1
            }
        };
        Ok((Ok(u32::try_from(handle).unwrap_or(u32::MAX)),))
    })
}

/// `tollgate:policy/key-sets.verify`: needs `verify-signatures`; at most
/// [`MAX_KEYS_PER_VERIFY`] keys tried, each counted as a `signatures.verify` call (and goes through the same cache). A kid the set does
/// not hold makes it wait for a (shared, rate-limited) refetch.
fn host_key_set_verify(
    mut store: StoreContextMut<'_, HostState>,
    (handle, alg, kid, message, signature): (u32, SigAlgorithm, Option<String>, Vec<u8>, Vec<u8>),
) -> Box<
    dyn std::future::Future<Output = wasmtime::Result<(Result<KsVerification, String>,)>>
        + Send
        + '_,
> {
    Box::new(async move {
        store
            .data_mut()
            .need(Capability::VerifySignatures, "called key-sets.verify")?;
        for (what, got, max) in [
            ("message", message.len(), MAX_VERIFY_MESSAGE_BYTES),
            ("signature", signature.len(), MAX_VERIFY_SIGNATURE_BYTES),
            ("kid", kid.as_ref().map_or(0, String::len), MAX_KID_BYTES),
        ] {
            if got > max {
                return Ok((Err(format!(
                    "{what} of {got} bytes is larger than key-sets.verify accepts ({max} bytes)"
                )),));
            }
        }
        let Some(alg) = algorithm(alg) else {
            return Ok((Err("unknown algorithm".into()),));
        };
        let Some(set) = store
            .data()
            .key_sets
            .get(usize::try_from(handle).unwrap_or(usize::MAX))
            .cloned()
        else {
            return Ok((Err(format!(
                "no key set {handle}: handles are what key-sets.register returned in this attachment's configure"
            )),));
        };
        let before = set.keys();
        let mut outcome = check_with(&store, &set, alg, kid.as_deref(), &message, &signature);
        // A kid the set does not hold: a refetch may bring it (the provider rotated). The wait
        // ends before the call's own deadline, so a slow provider gets the token refused, not
        // the call timed out.
        if matches!(outcome, Ok((c, false)) if c != key_sets::Checked::Valid) {
            let refetch = set.refetch_for_unknown_kid();
            match store.data().deadline {
                Some(d) => {
                    let until = d.checked_sub(REFETCH_MARGIN).unwrap_or(d);
                    let _ = tokio::time::timeout_at(until.into(), refetch).await;
                }
                None => {
                    refetch.await;
                }
            }
            waited(&mut store);
            // Checked again only when the keys changed (a refetch of ours or of another call).
            if !Arc::ptr_eq(&before, &set.keys()) {
                outcome = check_with(&store, &set, alg, kid.as_deref(), &message, &signature);
            }
        }
        Ok((outcome.map(|(c, _)| match c {
            key_sets::Checked::Valid => KsVerification::Valid,
            key_sets::Checked::Invalid => KsVerification::Invalid,
            key_sets::Checked::NoKey => KsVerification::NoKey,
        }),))
    })
}

/// How long before the call's deadline a wait for a refetch gives up.
const REFETCH_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// Keys tried by one `key-sets.verify` call, at most: the same bound jwt-validate applies to
/// its own keys.
pub const MAX_KEYS_PER_VERIFY: usize = 4;

/// The set's keys checked, the outcome or the error of a key that cannot be used.
fn check_with(
    store: &StoreContextMut<'_, HostState>,
    set: &KeySet,
    alg: tollgate_verify::Algorithm,
    kid: Option<&str>,
    message: &[u8],
    signature: &[u8],
) -> Result<(key_sets::Checked, bool), String> {
    set.check(alg, kid, MAX_KEYS_PER_VERIFY, |key| {
        let state = store.data();
        verify_key(
            &state.verified,
            state.signature_metrics.as_deref(),
            alg,
            key,
            message,
            signature,
        )
    })
}

type CtRate = bindings::tollgate::policy::counters::Rate;
type CtCounted = bindings::tollgate::policy::counters::Counted;

/// `counters.increment` calls one `on-handshake` call may make: a policy counts a handshake
/// under a key or two, and each call may cost a round trip to the fleet's store.
pub const MAX_COUNTER_CALLS_PER_CALL: u32 = 8;

/// `tollgate:policy/counters.increment`: `on-handshake` only, needs `use-counters`,
/// at most [`MAX_COUNTER_CALLS_PER_CALL`] per call; a store round trip is bounded by
/// `store_timeout` (`[cluster]`).
fn host_counter_increment(
    mut store: StoreContextMut<'_, HostState>,
    (key, rate, amount): (String, CtRate, u64),
) -> Box<dyn std::future::Future<Output = wasmtime::Result<(Result<CtCounted, String>,)>> + Send + '_>
{
    Box::new(async move {
        store
            .data_mut()
            .need(Capability::UseCounters, "called counters.increment")?;
        let state = store.data_mut();
        if state.request.is_none() {
            return Err(wasmtime::Error::msg(
                "counters.increment is only available in on-handshake",
            ));
        }
        state.counter_calls = state.counter_calls.saturating_add(1);
        if state.counter_calls > MAX_COUNTER_CALLS_PER_CALL {
            return Ok((Err(format!(
                "at most {MAX_COUNTER_CALLS_PER_CALL} counters.increment calls per call"
            )),));
        }
        let rate = match crate::counters::Rate::new(rate.limit, rate.window_seconds) {
            Ok(r) => r,
            Err(e) => return Ok((Err(e.to_string()),)),
        };
        let counters = state.counters.clone();
        let plugin = state.plugin.clone();
        let deadline = state.deadline;
        let counting = counters.increment(&plugin, &key, rate, amount);
        // A store round trip ends before the call's own deadline (store_timeout may be longer
        // than the policy's timeout), so the policy decides rather than the call timing out.
        let counted = match deadline {
            Some(d) => {
                let until = d.checked_sub(REFETCH_MARGIN).unwrap_or(d);
                tokio::time::timeout_at(until.into(), counting).await
            }
            None => Ok(counting.await),
        };
        waited(&mut store);
        let Ok(counted) = counted else {
            return Ok((Err(
                "counting did not finish before the policy call's deadline".into(),
            ),));
        };
        Ok((counted
            .map(|(c, _)| CtCounted {
                allowed: c.allowed,
                count: c.count,
                retry_after_ms: c.retry_after_ms,
                reset_after_ms: c.reset_after_ms,
            })
            .map_err(|e| e.to_string()),))
    })
}

/// Links our host interfaces by hand rather than through the generated `add_to_linker`, whose
/// host traits see only the state. That was needed while host calls charged fuel through the
/// store; since CPU time is counted by epochs they could move to the generated traits.
pub(super) fn add_host_interfaces(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wit_types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    wit::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    bindings::tollgate::policy::config::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    linker
        .instance(&format!("tollgate:policy/log@{WIT_VERSION}"))?
        .func_wrap("log", host_log)?;
    linker
        .instance(&format!("tollgate:policy/signatures@{WIT_VERSION}"))?
        .func_wrap("verify", host_verify)?;
    let mut key_sets = linker.instance(&format!("tollgate:policy/key-sets@{WIT_VERSION}"))?;
    key_sets.func_wrap_async("register", host_key_set_register)?;
    key_sets.func_wrap_async("verify", host_key_set_verify)?;
    linker
        .instance(&format!("tollgate:policy/counters@{WIT_VERSION}"))?
        .func_wrap_async("increment", host_counter_increment)?;
    // Types only (a message policy imports it for its records); nothing to link but the name.
    linker.instance(&format!("tollgate:policy/message-types@{WIT_VERSION}"))?;
    Ok(())
}

/// Clocks for a plugin without the clock grant: both read zero, so a policy cannot tell time
/// (or time anything) except through the request's `received-at`.
pub(super) struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}
