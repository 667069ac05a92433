//! Capped exponential backoff with full jitter, for transient faults of the
//! database, SQS and KMS.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Errors that know whether trying again can help. Implemented beside each
/// error type (the key wrapper's in `kms`), so that this module names none.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// Delay before retry number `attempt` (1-based): uniform in
    /// `[0, min(cap, base * 2^attempt)]`, so many workers hitting the same
    /// outage do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.cap);
        let ms = rand::thread_rng().gen_range(0..=ceiling.as_millis().max(1) as u64);
        Duration::from_millis(ms)
    }
}

/// What a retry does when `cancel` fires while it waits to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCancel {
    /// Return the last error (a receive loop: a last receive would only
    /// take messages that then wait out their visibility timeout).
    GiveUp,
    /// Try once more at once and return that try's result: work already
    /// in hand, which a shutdown should finish. A batch being retried when
    /// the worker is told to stop (the database just back, say) is then
    /// committed and acknowledged, as the other writers' batches are,
    /// instead of ending the run with the error of the try before.
    TryOnceMore,
}

/// Runs `op` until it succeeds, fails permanently, or `cancel` fires while
/// waiting (then as `on_cancel` says). `on_retry` sees each transient error
/// (for logs and metrics).
pub async fn retry<T, E, F, Fut>(
    backoff: Backoff,
    cancel: &CancellationToken,
    on_cancel: OnCancel,
    mut on_retry: impl FnMut(&E, u32),
    mut op: F,
) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                attempt += 1;
                on_retry(&e, attempt);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay(attempt)) => {}
                    _ = cancel.cancelled() => {
                        return match on_cancel {
                            OnCancel::GiveUp => Err(e),
                            OnCancel::TryOnceMore => op().await,
                        };
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error of the test's own: transient or not.
    #[derive(Debug)]
    enum StoreError {
        Transient(#[allow(dead_code)] String),
        Permanent(#[allow(dead_code)] String),
    }

    impl std::fmt::Display for StoreError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl Transient for StoreError {
        fn is_transient(&self) -> bool {
            matches!(self, StoreError::Transient(_))
        }
    }

    #[test]
    fn delays_are_capped_and_jittered() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        for attempt in 1..40 {
            assert!(b.delay(attempt) <= Duration::from_secs(2));
        }
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| b.delay(10)).collect();
        assert!(distinct.len() > 1, "no jitter");
    }

    #[tokio::test]
    async fn retries_transient_then_succeeds_and_stops_on_permanent() {
        let b = Backoff {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
        };
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let r: Result<u32, StoreError> = retry(
            b,
            &cancel,
            OnCancel::GiveUp,
            |_, _| {},
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(StoreError::Transient("down".into()))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(r.unwrap(), 3);

        let mut calls = 0;
        let r: Result<u32, StoreError> = retry(
            b,
            &cancel,
            OnCancel::GiveUp,
            |_, _| {},
            || {
                calls += 1;
                async { Err(StoreError::Permanent("bad".into())) }
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }

    /// Cancelled while waiting to try again: `GiveUp` returns the last
    /// error, `TryOnceMore` tries once more and returns that.
    #[tokio::test]
    async fn a_cancel_while_waiting_gives_up_or_tries_once_more_as_asked() {
        let slow = Backoff {
            base: Duration::from_secs(60),
            cap: Duration::from_secs(60),
        };
        // Fails once, then succeeds: the second call is the last try.
        let op = |calls: &std::cell::Cell<u32>| {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n == 1 {
                    Err(StoreError::Transient("down".into()))
                } else {
                    Ok(n)
                }
            }
        };
        for on_cancel in [OnCancel::GiveUp, OnCancel::TryOnceMore] {
            let cancel = CancellationToken::new();
            let calls = std::cell::Cell::new(0);
            let on_retry = |_: &StoreError, _| cancel.cancel();
            let r: Result<u32, StoreError> =
                retry(slow, &cancel, on_cancel, on_retry, || op(&calls)).await;
            if on_cancel == OnCancel::TryOnceMore {
                assert_eq!(r.unwrap(), 2, "the last try's result");
                assert_eq!(calls.get(), 2);
            } else {
                assert!(r.is_err(), "gave up with the last error");
                assert_eq!(calls.get(), 1);
            }
        }
    }
}
