//! Shrinking a failing operation list by delta debugging: drop chunks of
//! operations, halving the chunk size, while the list still fails, within
//! a budget of attempts and time.

use std::future::Future;
use std::time::{Duration, Instant};

/// Limits of one shrink.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Attempts (each runs a schedule).
    pub attempts: usize,
    /// Wall time.
    pub time: Duration,
}

/// What a shrink found.
#[derive(Clone, Debug)]
pub struct Shrunk {
    /// Indices (into the original list) of the operations that still fail.
    pub keep: Vec<usize>,
    /// Attempts made.
    pub attempts: usize,
    /// Whether the budget ran out before the list was 1-minimal.
    pub exhausted: bool,
}

/// Shrinks `0..len`: `fails(keep)` runs the operations at `keep` and says
/// whether they still fail.
pub async fn shrink<F, Fut>(len: usize, budget: Budget, mut fails: F) -> Shrunk
where
    F: FnMut(Vec<usize>) -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    let mut keep: Vec<usize> = (0..len).collect();
    let mut attempts = 0;
    let mut chunks = 2usize;
    let out_of_budget =
        |attempts: usize| attempts >= budget.attempts || started.elapsed() >= budget.time;
    while keep.len() > 1 {
        let size = keep.len().div_ceil(chunks);
        let mut removed = false;
        for start in (0..keep.len()).step_by(size) {
            if out_of_budget(attempts) {
                return Shrunk {
                    keep,
                    attempts,
                    exhausted: true,
                };
            }
            let candidate: Vec<usize> = keep[..start]
                .iter()
                .chain(keep[(start + size).min(keep.len())..].iter())
                .copied()
                .collect();
            attempts += 1;
            if fails(candidate.clone()).await {
                keep = candidate;
                chunks = (chunks - 1).max(2);
                removed = true;
                break;
            }
        }
        if !removed {
            if size == 1 {
                break;
            }
            chunks = (chunks * 2).min(keep.len());
        }
    }
    Shrunk {
        keep,
        attempts,
        exhausted: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shrinks_to_the_operations_that_matter() {
        let budget = Budget {
            attempts: 1_000,
            time: Duration::from_secs(10),
        };
        let fails = |k: Vec<usize>| async move { k.contains(&3) && k.contains(&17) };
        let s = shrink(40, budget, fails).await;
        assert_eq!(s.keep, vec![3, 17]);
        assert!(!s.exhausted);
        let tight = Budget {
            attempts: 3,
            ..budget
        };
        let s = shrink(40, tight, fails).await;
        assert!(s.exhausted && s.keep.len() > 2 && s.attempts == 3);
    }
}
