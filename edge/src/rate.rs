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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Charged since the fleet was last told (see [`MessageRate::charged`]).
    charged: f64,
}

impl Bucket {
    fn new(r: Rate, now: Instant) -> Bucket {
        Bucket {
            per_second: r.per_second as f64,
            burst: r.burst as f64,
            tokens: r.burst as f64,
            last: now,
            charged: 0.0,
        }
    }

    /// The bucket as this gateway's share (1 of `gateways`) of a fleet-wide `r`: the rate
    /// and burst divided, never a burst below `floor` (a message needs a whole token).
    fn share(&mut self, r: Rate, gateways: u64, floor: f64) {
        let n = gateways.max(1) as f64;
        self.per_second = r.per_second as f64 / n;
        self.burst = (r.burst as f64 / n).max(floor);
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
    // judges on its own buckets, as above, and settles with the fleet's store once per
    // interval: it reports what it charged ([`MessageRate::charged`]) and gets back the fleet
    // bucket's tokens and how many other gateways are spending from it; its own buckets then
    // hold its share of those ([`MessageRate::settle`]). No message waits on the store.

    /// What was charged since the last call, messages and bytes (rounded up), and forgets it.
    pub fn charged(&mut self) -> (u64, u64) {
        let take = |b: &mut Option<Bucket>| {
            b.as_mut().map_or(0, |b| {
                std::mem::replace(&mut b.charged, 0.0).ceil().max(0.0) as u64
            })
        };
        (take(&mut self.messages), take(&mut self.bytes))
    }

    /// Takes this gateway's share of the fleet's buckets under `spec`: `fleet` is what the
    /// store holds (message and byte tokens, after this gateway's last report), `gateways`
    /// how many spend from them (this one included). What this gateway charged since its
    /// report comes off its share at once; it is reported at the next settle.
    pub fn settle(&mut self, spec: &RateSpec, fleet: (f64, f64), gateways: u64, now: Instant) {
        let n = gateways.max(1) as f64;
        for (bucket, rate, tokens, floor) in [
            (&mut self.messages, spec.messages, fleet.0, 1.0),
            (&mut self.bytes, spec.bytes, fleet.1, 0.0),
        ] {
            if let (Some(b), Some(r)) = (bucket, rate) {
                b.share(r, gateways, floor);
                b.tokens = (tokens / n).min(b.burst) - b.charged;
                b.last = now;
            }
        }
    }

    /// This gateway's share (1 of `gateways`) of `spec`, without news from the fleet's store:
    /// at a subscription's first connection here, and while the store does not answer.
    pub fn share(&mut self, spec: &RateSpec, gateways: u64, now: Instant) {
        for (bucket, rate, floor) in [
            (&mut self.messages, spec.messages, 1.0),
            (&mut self.bytes, spec.bytes, 0.0),
        ] {
            if let (Some(b), Some(r)) = (bucket, rate) {
                b.refill(now);
                b.share(r, gateways, floor);
                b.tokens = b.tokens.min(b.burst);
            }
        }
    }
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
    fn a_fleets_buckets_are_shared_by_the_gateways_spending_from_them() {
        let t0 = Instant::now();
        let spec = spec(Some((10, 20)), Some((1000, 600)));
        let mut r = MessageRate::new(&spec, t0);
        // First connection in a fleet of four: a quarter, 5 messages (and 150 bytes) at once.
        r.share(&spec, 4, t0);
        assert_eq!((0..10).filter(|_| r.admit(10, t0).is_ok()).count(), 5);
        assert_eq!(r.charged(), (5, 50));
        assert_eq!(r.charged(), (0, 0), "reported once");
        // Charged after the report, before the answer: comes off the share the answer gives.
        assert_eq!(r.admit(0, t0 + Duration::from_millis(500)), Ok(()));
        // The store says 12 messages and 300 bytes are left, spent by two gateways: 6 and 150
        // each, less the one message charged meanwhile.
        r.settle(&spec, (12.0, 300.0), 2, t0);
        assert_eq!((0..10).filter(|_| r.admit(10, t0).is_ok()).count(), 5);
        // It refills at half the rate: 5 per second.
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!((0..10).filter(|_| r.admit(1, t1).is_ok()).count(), 1);
        assert_eq!(r.charged(), (7, 51));
        // The fleet in debt: nothing passes until the debt is repaid at this gateway's rate.
        r.settle(&spec, (-4.0, 100.0), 2, t1);
        assert_eq!(
            r.admit(1, t1 + Duration::from_millis(500)),
            Err(RateLimit::MessagesPerSecond)
        );
        assert_eq!(r.admit(1, t1 + Duration::from_millis(700)), Ok(()));
        // A tiny share still lets a whole message through, in time.
        let mut one = MessageRate::new(&spec, t1);
        one.settle(&spec, (20.0, 600.0), 40, t1);
        // Half a token, refilled at a quarter per second: a whole one in 2 s.
        assert_eq!(one.admit(1, t1), Err(RateLimit::MessagesPerSecond));
        let t2 = t1 + Duration::from_millis(2100);
        assert_eq!(one.admit(1, t2), Ok(()));
        assert_eq!(one.admit(1, t2), Err(RateLimit::MessagesPerSecond));
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
