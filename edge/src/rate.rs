//! Message rate limits of one relayed direction (`[[apis.message_limits]]`): messages and
//! payload bytes per second, each a token bucket with a burst allowance.
//!
//! A message is judged when its first frame arrives: it needs one message token, and as many
//! byte tokens as the frame's payload (at most the burst, so a frame larger than the burst
//! passes on a full bucket, into debt). Judging at the first frame is what lets `drop` work on
//! a stream: a message is either forwarded from its first byte or not at all, never cut in the
//! middle. Each later frame of the message must fit the byte bucket the same way; one that
//! does not can no longer be dropped, and the parser ends the connection instead.
//!
//! Written by hand rather than with a rate-limiting crate (`governor`): the state is two
//! numbers per bucket owned by one connection's task (no atomics, no shared map), the byte
//! bucket needs debt, and tests drive it with their own clock.

use std::time::Instant;

/// What happens to a message over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateAction {
    /// The connection is closed: 1008 to the sender, 1001 to the other side.
    Close,
    /// The message is not forwarded (counted); the connection goes on.
    Drop,
}

impl RateAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RateAction::Close => "close",
            RateAction::Drop => "drop",
        }
    }
}

/// Which limit a message was over (the `limit` label of the metrics, the manifest key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimit {
    MessagesPerSecond,
    BytesPerSecond,
}

impl RateLimit {
    pub fn key(self) -> &'static str {
        match self {
            RateLimit::MessagesPerSecond => "max_messages_per_second",
            RateLimit::BytesPerSecond => "max_bytes_per_second",
        }
    }

    /// The reason in the close frame (code 1008).
    pub fn reason(self) -> &'static str {
        match self {
            RateLimit::MessagesPerSecond => "message rate exceeds max_messages_per_second",
            RateLimit::BytesPerSecond => "byte rate exceeds max_bytes_per_second",
        }
    }
}

/// A rate: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u64,
    pub burst: u64,
}

/// The limits of one direction, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub messages: Option<Rate>,
    pub bytes: Option<Rate>,
    pub action: RateAction,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    per_second: f64,
    burst: f64,
    /// May be negative (debt) for the byte bucket.
    tokens: f64,
    last: Instant,
    /// Charged since the fleet was last told, and asked for (charged or refused): see
    /// [`MessageRate::report`].
    charged: f64,
    demanded: f64,
}

impl Bucket {
    fn new(r: Rate, now: Instant) -> Bucket {
        Bucket {
            per_second: r.per_second as f64,
            burst: r.burst as f64,
            tokens: r.burst as f64,
            last: now,
            charged: 0.0,
            demanded: 0.0,
        }
    }

    /// The bucket as a share of a fleet-wide `r`: the rate times `rate_share`, the burst
    /// times `burst_share`, never a burst below `floor` (a message needs a whole token).
    fn share(&mut self, r: Rate, rate_share: f64, burst_share: f64, floor: f64) {
        self.per_second = r.per_second as f64 * rate_share;
        self.burst = (r.burst as f64 * burst_share).max(floor);
    }

    fn charge(&mut self, amount: f64) {
        self.tokens -= amount;
        self.charged += amount;
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
    }
}

/// The buckets of one direction of one connection.
#[derive(Debug, Clone)]
pub struct MessageRate {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    pub action: RateAction,
}

impl MessageRate {
    /// Full buckets: a new connection may send its whole burst at once.
    pub fn new(spec: &RateSpec, now: Instant) -> MessageRate {
        MessageRate {
            messages: spec.messages.map(|r| Bucket::new(r, now)),
            bytes: spec.bytes.map(|r| Bucket::new(r, now)),
            action: spec.action,
        }
    }

    /// A message starts with a first frame of `first_frame_len` payload bytes: `Ok` charges
    /// it, `Err` names the limit it is over (and charges nothing).
    pub fn admit(&mut self, first_frame_len: u64, now: Instant) -> Result<(), RateLimit> {
        self.check(first_frame_len, now)?;
        self.take(first_frame_len);
        Ok(())
    }

    /// [`MessageRate::admit`]'s check alone, so that two sets of buckets (the connection's and
    /// its subscription's) are charged only when both admit the message.
    pub fn check(&mut self, first_frame_len: u64, now: Instant) -> Result<(), RateLimit> {
        if let Some(m) = &mut self.messages {
            m.refill(now);
            m.demanded += 1.0;
            if m.tokens < 1.0 {
                return Err(RateLimit::MessagesPerSecond);
            }
        }
        self.check_bytes(first_frame_len, now)
    }

    /// The byte bucket's part of [`MessageRate::check`], alone: for a later frame of a message
    /// (which needs no message token, but must fit the byte rate like a first frame).
    pub fn check_bytes(&mut self, frame_len: u64, now: Instant) -> Result<(), RateLimit> {
        if let Some(b) = &mut self.bytes {
            b.refill(now);
            b.demanded += frame_len as f64;
            // A frame larger than the burst could never pass a full-cost check: it passes when
            // the bucket is full, and goes into debt.
            // (In debt, it refuses even an empty frame: the minimum is never below 0.)
            if b.tokens < (frame_len as f64).min(b.burst) {
                return Err(RateLimit::BytesPerSecond);
            }
        }
        Ok(())
    }

    /// Charges an admitted message's first frame (after [`MessageRate::check`]).
    pub fn take(&mut self, first_frame_len: u64) {
        if let Some(m) = &mut self.messages {
            m.charge(1.0);
        }
        self.charge(first_frame_len);
    }

    /// Charges a later frame of an admitted message.
    pub fn charge(&mut self, len: u64) {
        if let Some(b) = &mut self.bytes {
            b.charge(len as f64);
        }
    }

    // A subscription's buckets shared by a fleet of gateways (`[cluster]`): each gateway
    // judges every message on its own buckets, as above, and settles with the fleet's store
    // once per interval: it reports what it charged and what it was asked for
    // ([`MessageRate::report`]), and takes its share of the fleet bucket's tokens and rate
    // ([`MessageRate::settle`]). No message waits on the store.

    /// What was charged, and asked for (charged or refused), since the last report, and
    /// forgets it.
    pub fn report(&mut self) -> Report {
        let take = |b: &mut Option<Bucket>| {
            b.as_mut().map_or((0, 0), |b| {
                let whole = |v: f64| v.ceil().max(0.0) as u64;
                (
                    whole(std::mem::replace(&mut b.charged, 0.0)),
                    whole(std::mem::replace(&mut b.demanded, 0.0)),
                )
            })
        };
        let (m, b) = (take(&mut self.messages), take(&mut self.bytes));
        Report {
            charged: (m.0, b.0),
            demanded: (m.1, b.1),
        }
    }

    /// Takes this gateway's share of the fleet's buckets under `spec`.
    ///
    /// The rate is shared by demand (`share.weights`, which add up to 1 across the gateways
    /// present): what the fleet admits on average is the rate. The tokens (and the burst) are
    /// at least an equal share (1 of `share.gateways`), so a connection that was quiet on this
    /// gateway can still send while the subscription is under its limit; at once the fleet
    /// may then admit up to about twice the burst, which the fleet bucket's debt pays back.
    /// A share of less than one message token is a whole token with that probability
    /// (`chance`, uniform in [0, 1)), so many gateways sharing a small burst each get a turn
    /// instead of none ever reaching a whole token. What this gateway charged since its report
    /// comes off at once (it is reported next time).
    pub fn settle(&mut self, spec: &RateSpec, share: &FleetShare, now: Instant, chance: f64) {
        let n = share.gateways.max(1) as f64;
        for (bucket, rate, tokens, weight, whole) in [
            (
                &mut self.messages,
                spec.messages,
                share.tokens.0,
                share.weights.0,
                true,
            ),
            (
                &mut self.bytes,
                spec.bytes,
                share.tokens.1,
                share.weights.1,
                false,
            ),
        ] {
            if let (Some(b), Some(r)) = (bucket, rate) {
                let w = weight.clamp(0.0, 1.0);
                let mine = w.max(1.0 / n);
                b.share(r, w, mine, if whole { 1.0 } else { 0.0 });
                let mut t = tokens * mine;
                if whole && t > 0.0 && t < 1.0 {
                    t = if chance < t { 1.0 } else { 0.0 };
                }
                b.tokens = t.min(b.burst) - b.charged;
                b.last = now;
            }
        }
    }

    /// This gateway's share (1 of `gateways`) of `spec`, without news from the fleet's store:
    /// at a subscription's first connection here, and while the store does not answer.
    pub fn share(&mut self, spec: &RateSpec, gateways: u64, now: Instant) {
        let one = 1.0 / gateways.max(1) as f64;
        for (bucket, rate, floor) in [
            (&mut self.messages, spec.messages, 1.0),
            (&mut self.bytes, spec.bytes, 0.0),
        ] {
            if let (Some(b), Some(r)) = (bucket, rate) {
                b.refill(now);
                b.share(r, one, one, floor);
                b.tokens = b.tokens.min(b.burst);
            }
        }
    }
}

/// What a gateway tells the fleet's store about one shared bucket at a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// Messages and bytes charged.
    pub charged: (u64, u64),
    /// Messages and bytes asked for: charged, or refused.
    pub demanded: (u64, u64),
}

/// What the fleet's store answers about one shared bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetShare {
    /// Message and byte tokens the fleet bucket holds (negative: its debt).
    pub tokens: (f64, f64),
    /// This gateway's share of the demand for messages and bytes (0 to 1).
    pub weights: (f64, f64),
    /// Gateways with connections drawing from the bucket, this one included.
    pub gateways: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// How long until a message of one byte would be admitted.
    fn wait(r: &MessageRate) -> Duration {
        let need = |b: &Option<Bucket>, want: f64| {
            b.map_or(0.0, |b| {
                if b.tokens >= want {
                    0.0
                } else {
                    (want - b.tokens) / b.per_second.max(f64::MIN_POSITIVE)
                }
            })
        };
        Duration::from_secs_f64(need(&r.messages, 1.0).max(need(&r.bytes, 1.0)))
    }

    fn spec(messages: Option<(u64, u64)>, bytes: Option<(u64, u64)>) -> RateSpec {
        let r = |(per_second, burst)| Rate { per_second, burst };
        RateSpec {
            messages: messages.map(r),
            bytes: bytes.map(r),
            action: RateAction::Drop,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = Instant::now();
        let mut r = MessageRate::new(&spec(Some((10, 20)), None), t0);
        for i in 0..20 {
            assert_eq!(r.admit(5, t0), Ok(()), "message {i} of the burst");
        }
        assert_eq!(r.admit(5, t0), Err(RateLimit::MessagesPerSecond));
        // 100 ms later: one more token (10 per second).
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.admit(5, t1), Ok(()));
        assert_eq!(r.admit(5, t1), Err(RateLimit::MessagesPerSecond));
        // A refused message costs nothing: after 1 s, ten pass.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!((0..12).filter(|_| r.admit(5, t2).is_ok()).count(), 10);
    }

    #[test]
    fn bytes_are_charged_per_frame_and_a_large_message_goes_into_debt() {
        let t0 = Instant::now();
        let mut r = MessageRate::new(&spec(None, Some((1000, 1000))), t0);
        assert_eq!(r.admit(600, t0), Ok(()));
        assert_eq!(r.admit(600, t0), Err(RateLimit::BytesPerSecond));
        assert_eq!(r.admit(400, t0), Ok(()));
        // A message bigger than the burst passes on a full bucket, in pieces, into debt.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.admit(3000, t1), Ok(()));
        r.charge(1000);
        assert_eq!(r.admit(1, t1), Err(RateLimit::BytesPerSecond));
        // 3 s of debt to repay before even one byte passes.
        assert_eq!(wait(&r), Duration::from_secs_f64(3.001));
        assert_eq!(
            r.admit(1, t1 + Duration::from_millis(2900)),
            Err(RateLimit::BytesPerSecond)
        );
        assert_eq!(r.admit(1, t1 + Duration::from_millis(3100)), Ok(()));
    }

    #[test]
    fn a_fleets_buckets_are_shared_by_demand_with_at_least_an_equal_share() {
        let t0 = Instant::now();
        let spec = spec(Some((10, 20)), Some((1000, 600)));
        let mut r = MessageRate::new(&spec, t0);
        // First connection in a fleet of four: a quarter, 5 messages (and 150 bytes) at once.
        r.share(&spec, 4, t0);
        assert_eq!((0..10).filter(|_| r.admit(10, t0).is_ok()).count(), 5);
        assert_eq!(
            r.report(),
            Report {
                charged: (5, 50),
                demanded: (10, 50)
            }
        );
        assert_eq!(r.report(), Report::default(), "reported once");
        // Charged after the report, before the answer: comes off the share the answer gives.
        assert_eq!(r.admit(0, t0 + Duration::from_millis(500)), Ok(()));
        // 12 messages and 300 bytes left in the fleet; this gateway asked for three quarters
        // of the messages, two gateways present: 9 tokens (less the one charged meanwhile), at
        // three quarters of the rate.
        let busy = FleetShare {
            tokens: (12.0, 300.0),
            weights: (0.75, 0.75),
            gateways: 2,
        };
        r.settle(&spec, &busy, t0, 0.5);
        assert_eq!((0..20).filter(|_| r.admit(1, t0).is_ok()).count(), 8);
        let t1 = t0 + Duration::from_millis(400);
        assert_eq!((0..10).filter(|_| r.admit(1, t1).is_ok()).count(), 3);
        // A quiet gateway still gets its equal share, half of what is left.
        let quiet = FleetShare {
            weights: (0.0, 0.0),
            ..busy
        };
        let mut q = MessageRate::new(&spec, t0);
        q.settle(&spec, &quiet, t0, 0.5);
        assert_eq!((0..20).filter(|_| q.admit(1, t0).is_ok()).count(), 6);
        // ... but refills at its share of the demand: none.
        assert_eq!(
            q.admit(1, t0 + Duration::from_secs(5)),
            Err(RateLimit::MessagesPerSecond)
        );
        // The fleet in debt: nothing passes until it is paid back at this gateway's rate
        // (7.5 per second: 3 tokens of debt and a whole one take 533 ms).
        let _ = r.report();
        r.settle(
            &spec,
            &FleetShare {
                tokens: (-4.0, 100.0),
                ..busy
            },
            t1,
            0.5,
        );
        assert_eq!(
            r.admit(1, t1 + Duration::from_millis(500)),
            Err(RateLimit::MessagesPerSecond)
        );
        assert_eq!(r.admit(1, t1 + Duration::from_millis(600)), Ok(()));
    }

    #[test]
    fn a_share_below_one_token_is_a_whole_token_by_chance() {
        let t0 = Instant::now();
        let spec = spec(Some((5, 5)), None);
        // Ten gateways on a burst of 5: half a token each, so a whole one half of the time.
        let crowd = FleetShare {
            tokens: (5.0, 0.0),
            weights: (0.1, 0.0),
            gateways: 10,
        };
        let admitted: usize = (0..1000)
            .map(|i| {
                let mut r = MessageRate::new(&spec, t0);
                r.settle(&spec, &crowd, t0, (i as f64 + 0.5) / 1000.0);
                usize::from(r.admit(1, t0).is_ok())
            })
            .sum();
        assert_eq!(admitted, 500);
    }

    #[test]
    fn both_limits_apply_and_the_first_one_over_is_named() {
        let t0 = Instant::now();
        let mut r = MessageRate::new(&spec(Some((1, 1)), Some((100, 100))), t0);
        assert_eq!(r.admit(10, t0), Ok(()));
        assert_eq!(r.admit(10, t0), Err(RateLimit::MessagesPerSecond));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(r.admit(200, t1), Ok(()));
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(r.admit(1, t2), Err(RateLimit::BytesPerSecond));
    }
}
