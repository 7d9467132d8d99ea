//! Retry with exponential back-off and full jitter, as a schedule (sans I/O) plus a small async
//! runner for the transports.

use std::future::Future;
use std::time::Duration;

use crate::AgentError;

/// When to try again.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay ceiling before the second attempt.
    pub initial: Duration,
    /// Largest delay between attempts.
    pub max: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            max_attempts: 8,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt + 1` (after `attempt` failures, from 1), or `None`
    /// when attempts are used up. `jitter` in [0, 1) picks the point in the window (full jitter).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        let ceiling = self.initial.saturating_mul(exp).min(self.max);
        Some(ceiling.mul_f64(jitter.clamp(0.0, 1.0)))
    }
}

/// Runs `op` until it succeeds, fails permanently, or attempts run out.
pub async fn run<T, F, Fut>(backoff: Backoff, mut op: F) -> Result<T, AgentError>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, AgentError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => match backoff.delay(attempt, jitter()) {
                Some(d) => {
                    tracing::debug!(attempt, error = %e, delay_ms = d.as_millis() as u64, "retrying");
                    tokio::time::sleep(d).await;
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_stop() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            max_attempts: 6,
        };
        let windows: Vec<_> = (1..=6).map(|a| b.delay(a, 0.999_999)).collect();
        assert_eq!(windows[0].unwrap().as_millis(), 99);
        assert_eq!(windows[1].unwrap().as_millis(), 199);
        assert_eq!(windows[3].unwrap().as_millis(), 799);
        assert_eq!(windows[4].unwrap().as_millis(), 999);
        assert_eq!(windows[5], None);
        assert_eq!(b.delay(1, 0.0), Some(Duration::ZERO));
    }
}
