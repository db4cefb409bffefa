//! How a sink is delivered to: its retry policy (attempts, exponential backoff with jitter,
//! which outcomes are worth another try), its circuit breaker (after N failures in a row, stop
//! trying for a while, then let one probe through), and its rate limit (a token bucket, and the
//! receiver's `Retry-After`). Work held back by a breaker or a limit waits in its queue; it is
//! never dropped and spends no attempt.

use crate::build::{BuildContext, Diags};
use crate::config::{DiagCode, Spanned};
use governor::clock::{Clock, DefaultClock};
use schemars::JsonSchema;
use serde::Deserialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `retry:` of a sink.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (default: the pipeline's `runtime.max_attempts`, 5).
    #[serde(default)]
    pub max_attempts: Option<Spanned<u32>>,
    /// Wait before the second attempt (default `1s`); it doubles for each attempt after.
    #[serde(default)]
    pub initial_delay: Option<Spanned<String>>,
    /// Longest wait between attempts (default `1m`).
    #[serde(default)]
    pub max_delay: Option<Spanned<String>>,
    /// HTTP statuses worth another attempt (default `[408, 429, "5xx"]`); other 4xx are
    /// permanent and go to exceptions at once. Timeouts and connection errors are always retried.
    #[serde(default)]
    pub transient_statuses: Option<Spanned<Vec<StatusPattern>>>,
}

/// A status code, or a class such as `"5xx"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StatusPattern {
    Code(u16),
    Class(String),
}

/// `circuit_breaker:` of a sink.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Failures in a row that open the breaker (default 5).
    #[serde(default)]
    pub failures: Option<Spanned<u32>>,
    /// How long it stays open before one probe is let through (default `30s`).
    #[serde(default)]
    pub open_for: Option<Spanned<String>>,
}

/// `rate_limit:` of a sink.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Messages per second, minute or hour: `10/s`, `600/m`, `5000/h`.
    pub rate: Spanned<String>,
    /// Messages that may go at once after a quiet spell (default: one second's worth, at least 1).
    #[serde(default)]
    pub burst: Option<Spanned<u32>>,
}

/// A sink's delivery settings as written.
#[derive(Debug, Clone, Default)]
pub struct DeliveryConfig<'a> {
    pub retry: Option<&'a RetryConfig>,
    pub circuit_breaker: Option<&'a CircuitBreakerConfig>,
    pub rate_limit: Option<&'a RateLimitConfig>,
}

/// The retry policy, checked and with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub transient_statuses: Vec<StatusPattern>,
}

impl RetryPolicy {
    pub fn new(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            transient_statuses: vec![StatusPattern::Code(408), StatusPattern::Code(429), StatusPattern::Class("5xx".into())],
        }
    }

    /// The wait after failed attempt `attempt` (1-based): exponential, capped, with full jitter
    /// (a random wait up to the exponential one, at least a tenth of it) so that engines retrying
    /// together do not come back together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(self.max_delay);
        exp.mul_f64(0.1 + 0.9 * fastrand::f64())
    }

    /// Whether an HTTP status is worth another attempt.
    pub fn transient_status(&self, status: u16) -> bool {
        self.transient_statuses.iter().any(|p| match p {
            StatusPattern::Code(c) => *c == status,
            StatusPattern::Class(c) => c.len() == 3 && c.as_bytes()[0] == b'0' + (status / 100) as u8,
        })
    }
}

/// What a breaker says about the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Go ahead.
    Open,
    /// Held back until then.
    Wait(Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe is out since then; the others wait for its outcome. A probe never judged (its
    /// connection lost before its answer) gives way to another after `open_for`.
    HalfOpen {
        since: Instant,
    },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half-open",
        }
    }
}

/// A circuit breaker.
#[derive(Debug)]
pub struct CircuitBreaker {
    failures_to_open: u32,
    open_for: Duration,
    inner: Mutex<(BreakerState, u32)>,
}

/// How long held-back work waits before it is looked at again while a probe is out.
const PROBE_WAIT: Duration = Duration::from_millis(500);

impl CircuitBreaker {
    pub fn new(failures_to_open: u32, open_for: Duration) -> CircuitBreaker {
        CircuitBreaker { failures_to_open, open_for, inner: Mutex::new((BreakerState::Closed, 0)) }
    }

    pub fn state(&self) -> BreakerState {
        self.inner.lock().expect("breaker").0
    }

    /// The state and the failures in a row.
    pub fn snapshot(&self) -> (BreakerState, u32) {
        *self.inner.lock().expect("breaker")
    }

    /// Whether an attempt may go now. Past its open time, the first caller is the probe.
    pub fn gate(&self) -> Gate {
        let mut g = self.inner.lock().expect("breaker");
        match g.0 {
            BreakerState::Closed => Gate::Open,
            BreakerState::Open { until } if Instant::now() >= until => {
                g.0 = BreakerState::HalfOpen { since: Instant::now() };
                Gate::Open
            }
            BreakerState::Open { until } => Gate::Wait(until),
            BreakerState::HalfOpen { since } if since.elapsed() >= self.open_for => {
                g.0 = BreakerState::HalfOpen { since: Instant::now() };
                Gate::Open
            }
            BreakerState::HalfOpen { .. } => Gate::Wait(Instant::now() + PROBE_WAIT),
        }
    }

    /// The receiver answered (delivered, or refused for good: it is up). Returns the state it
    /// left when that changed, for the log.
    pub fn success(&self) -> Option<BreakerState> {
        let mut g = self.inner.lock().expect("breaker");
        g.1 = 0;
        let was = g.0;
        g.0 = BreakerState::Closed;
        (was != BreakerState::Closed).then_some(was)
    }

    /// A failure worth retrying. Returns the new state when this opened the breaker.
    pub fn failure(&self) -> Option<BreakerState> {
        let mut g = self.inner.lock().expect("breaker");
        g.1 = g.1.saturating_add(1);
        let opens = matches!(g.0, BreakerState::HalfOpen { .. }) || (matches!(g.0, BreakerState::Closed) && g.1 >= self.failures_to_open);
        if opens {
            g.0 = BreakerState::Open { until: Instant::now() + self.open_for };
            return Some(g.0);
        }
        None
    }
}

/// A token bucket, and a pause the receiver asked for (`Retry-After`).
pub struct RateLimit {
    limiter: Option<governor::DefaultDirectRateLimiter>,
    paused_until: Mutex<Option<Instant>>,
    pub described: String,
}

impl RateLimit {
    /// Whether a message may go now; if not, how long until it may.
    pub fn check(&self) -> Result<(), Duration> {
        if let Some(until) = *self.paused_until.lock().expect("pause")
            && until > Instant::now()
        {
            return Err(until - Instant::now());
        }
        match &self.limiter {
            None => Ok(()),
            Some(l) => l.check().map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now())),
        }
    }

    /// Until when the receiver asked to wait, if that is still ahead.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until.lock().expect("pause").filter(|u| *u > Instant::now())
    }

    /// The receiver asked for a pause.
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut p = self.paused_until.lock().expect("pause");
        if p.is_none_or(|u| u < until) {
            *p = Some(until);
        }
    }
}

/// A sink's delivery settings, built.
pub struct Delivery {
    pub retry: RetryPolicy,
    pub breaker: Option<CircuitBreaker>,
    pub rate: RateLimit,
}

impl Delivery {
    /// The settings of a sink without any: retries as the pipeline's runtime says, no breaker,
    /// no limit (a `Retry-After` is still honoured).
    pub fn plain(max_attempts: u32) -> Delivery {
        Delivery {
            retry: RetryPolicy::new(max_attempts),
            breaker: None,
            rate: RateLimit { limiter: None, paused_until: Mutex::new(None), described: String::new() },
        }
    }

    /// Whether this sink holds messages back now (its circuit open or probing, or a pause the
    /// receiver asked for), looked at without taking a probe or a token: a message routed to
    /// several sinks is held before any of them is written, never between.
    pub fn would_hold(&self) -> Option<Instant> {
        let now = Instant::now();
        let breaker = self.breaker.as_ref().and_then(|b| match b.state() {
            BreakerState::Open { until } if until > now => Some(until),
            BreakerState::HalfOpen { since } if since.elapsed() < b.open_for => Some(now + PROBE_WAIT),
            _ => None,
        });
        breaker.into_iter().chain(self.rate.paused_until()).max()
    }

    /// Checks and builds a sink's `retry`, `circuit_breaker` and `rate_limit`.
    pub fn build(c: &DeliveryConfig, at: &str, default_attempts: u32, cx: &BuildContext, diags: &mut Diags) -> Delivery {
        let mut d = Delivery::plain(default_attempts);
        // Bounded: a wait past a day is a typo, and would overflow the clock arithmetic.
        let duration = |v: &Spanned<String>, key: &str, diags: &mut Diags| -> Option<Duration> {
            let range = Duration::from_millis(1)..=Duration::from_secs(24 * 3600);
            diags.take(cx.duration(v, &format!("{at}.{key}"), range, "a duration from `1ms` to `24h`, such as `500ms`, `30s`, `5m`"))
        };
        let count = |v: &Spanned<u32>, key: &str, diags: &mut Diags| -> Option<u32> {
            if v.value == 0 {
                diags.push(cx.diag(DiagCode::InvalidValue, v.span, &format!("{at}.{key}"), format!("`{key}` is 0")).expected("1 or more"));
                return None;
            }
            Some(v.value)
        };
        if let Some(r) = c.retry {
            if let Some(n) = r.max_attempts.as_ref().and_then(|v| count(v, "retry.max_attempts", diags)) {
                d.retry.max_attempts = n;
            }
            if let Some(v) = r.initial_delay.as_ref().and_then(|v| duration(v, "retry.initial_delay", diags)) {
                d.retry.initial_delay = v;
            }
            if let Some(v) = r.max_delay.as_ref().and_then(|v| duration(v, "retry.max_delay", diags)) {
                d.retry.max_delay = v;
            }
            if let Some(s) = &r.transient_statuses {
                for p in &s.value {
                    let ok = match p {
                        StatusPattern::Code(c) => (100..=599).contains(c),
                        StatusPattern::Class(c) => matches!(c.as_str(), "4xx" | "5xx"),
                    };
                    if !ok {
                        diags.push(
                            cx.diag(
                                DiagCode::InvalidValue,
                                s.span,
                                &format!("{at}.retry.transient_statuses"),
                                format!("`{p:?}` is not an HTTP status"),
                            )
                            .expected("status codes such as 429 or 503, or `\"5xx\"`"),
                        );
                    }
                }
                d.retry.transient_statuses = s.value.clone();
            }
        }
        if let Some(b) = c.circuit_breaker {
            let failures = b.failures.as_ref().and_then(|v| count(v, "circuit_breaker.failures", diags)).unwrap_or(5);
            let open_for =
                b.open_for.as_ref().and_then(|v| duration(v, "circuit_breaker.open_for", diags)).unwrap_or(Duration::from_secs(30));
            d.breaker = Some(CircuitBreaker::new(failures, open_for));
        }
        if let Some(r) = c.rate_limit
            && let Some(rate) = RateLimit::build(r, &format!("{at}.rate_limit"), cx, diags)
        {
            d.rate = rate;
        }
        d
    }
}

impl RateLimitConfig {
    /// Checks it (at `at`): governor's quota, and the rate as said in summaries.
    pub fn quota(&self, at: &str, cx: &BuildContext, diags: &mut Diags) -> Option<(governor::Quota, String)> {
        let r = self;
        let Some((n, per)) = parse_rate(&r.rate.value) else {
            diags.push(
                cx.diag(DiagCode::InvalidValue, r.rate.span, &format!("{at}.rate"), format!("`{}` is not a rate", r.rate.shown()))
                    .expected("messages per second, minute or hour, e.g. `10/s`, `600/m`, `5000/h`"),
            );
            return None;
        };
        let per_cell = per / n;
        let burst = match &r.burst {
            Some(b) if b.value == 0 => {
                diags.push(cx.diag(DiagCode::InvalidValue, b.span, &format!("{at}.burst"), "`burst` is 0").expected("1 or more"));
                return None;
            }
            Some(b) => b.value,
            None => ((Duration::from_secs(1).as_nanos() / per_cell.as_nanos().max(1)) as u32).max(1),
        };
        let quota = governor::Quota::with_period(per_cell.max(Duration::from_nanos(1)))
            .expect("a positive period")
            .allow_burst(std::num::NonZeroU32::new(burst).expect("at least 1"));
        Some((quota, format!("{} (burst {burst})", r.rate.value.trim())))
    }
}

impl RateLimit {
    /// Checks and builds a `rate_limit:` (at `at`).
    pub fn build(r: &RateLimitConfig, at: &str, cx: &BuildContext, diags: &mut Diags) -> Option<RateLimit> {
        let (quota, described) = r.quota(at, cx, diags)?;
        Some(RateLimit { limiter: Some(governor::RateLimiter::direct(quota)), paused_until: Mutex::new(None), described })
    }

    /// Waits for a token up to `inline_wait`; past it, says until when to hold back.
    pub async fn admit(&self, inline_wait: Duration) -> Result<(), Instant> {
        loop {
            match self.check() {
                Ok(()) => return Ok(()),
                Err(w) if w <= inline_wait => tokio::time::sleep(w).await,
                Err(w) => return Err(Instant::now() + w),
            }
        }
    }
}

/// `10/s` -> (10, 1 s).
fn parse_rate(s: &str) -> Option<(u32, Duration)> {
    let (n, unit) = s.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some((n, per))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let p = RetryPolicy { max_delay: Duration::from_secs(8), ..RetryPolicy::new(10) };
        for (attempt, cap) in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)] {
            for _ in 0..50 {
                let d = p.delay(attempt);
                assert!(d <= Duration::from_secs(cap) && d >= Duration::from_secs(cap).mul_f64(0.1), "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn statuses_are_transient_by_code_or_class() {
        let p = RetryPolicy::new(3);
        assert!([408, 429, 500, 502, 503, 599].iter().all(|s| p.transient_status(*s)));
        assert!(![400, 401, 404, 409, 422].iter().any(|s| p.transient_status(*s)));
    }

    #[test]
    fn a_breaker_opens_after_failures_in_a_row_then_lets_one_probe_through() {
        let b = CircuitBreaker::new(3, Duration::from_millis(50));
        assert_eq!(b.failure(), None);
        assert_eq!(b.success(), None, "a success resets the count");
        b.failure();
        b.failure();
        assert!(matches!(b.failure(), Some(BreakerState::Open { .. })));
        assert!(matches!(b.gate(), Gate::Wait(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.gate(), Gate::Open, "the probe");
        assert!(matches!(b.state(), BreakerState::HalfOpen { .. }));
        assert!(matches!(b.gate(), Gate::Wait(_)), "one probe at a time");
        assert!(matches!(b.failure(), Some(BreakerState::Open { .. })), "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.gate(), Gate::Open);
        assert!(matches!(b.success(), Some(BreakerState::HalfOpen { .. })));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_probe_never_answered_gives_way_to_another() {
        let b = CircuitBreaker::new(1, Duration::from_millis(50));
        b.failure();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.gate(), Gate::Open, "the probe, whose answer never comes");
        assert!(matches!(b.gate(), Gate::Wait(_)));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.gate(), Gate::Open, "after open_for, another probe");
    }

    #[test]
    fn rates_parse_and_a_limit_holds_back_past_its_burst() {
        assert_eq!(parse_rate("10/s"), Some((10, Duration::from_secs(1))));
        assert_eq!(parse_rate(" 600 / m "), Some((600, Duration::from_secs(60))));
        assert_eq!(parse_rate("0/s"), None);
        assert_eq!(parse_rate("fast"), None);
        let quota = governor::Quota::with_period(Duration::from_millis(100)).unwrap().allow_burst(std::num::NonZeroU32::new(2).unwrap());
        let r = RateLimit { limiter: Some(governor::RateLimiter::direct(quota)), paused_until: Mutex::new(None), described: String::new() };
        assert!(r.check().is_ok() && r.check().is_ok(), "the burst");
        let wait = r.check().expect_err("past the burst");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        let plain = Delivery::plain(5).rate;
        plain.pause_for(Duration::from_millis(200));
        let wait = plain.check().expect_err("Retry-After holds everything back");
        assert!(wait > Duration::from_millis(100), "{wait:?}");
    }
}
