//! Adaptive busy-polling: how long a queue worker keeps looking at its ring after a pass before
//! it goes back to sleep on its eventfds.
//!
//! Sleeping costs a wake-up per batch on each side of the ring (the kick that wakes the worker,
//! the interrupt that wakes the driver). On a host whose CPUs are virtual, waking an idle CPU
//! is an inter-processor interrupt through the hypervisor, tens of microseconds, and it is paid
//! twice per batch. A worker that is still looking at the ring when the driver's next batch
//! arrives pays neither the kick nor its own wake-up.
//!
//! Polling must not burn a CPU for a queue that is idle, so the budget adapts, as QEMU's
//! `poll-max-ns` does: it starts at zero, grows (doubling from [`MIN_BUDGET`] up to the
//! configured maximum) each time the worker was woken sooner than the maximum after it went
//! idle, stays while polls find work, and drops to zero as soon as the worker was idle longer
//! than the maximum. A queue that is busy polls; a queue that is quiet sleeps after at most one
//! wasted budget.

use std::time::{Duration, Instant};

/// The first non-zero budget.
pub const MIN_BUDGET: Duration = Duration::from_micros(4);

/// The polling budget of one queue worker.
#[derive(Debug)]
pub struct AdaptivePoll {
    max: Duration,
    budget: Duration,
    /// When the worker last ran out of work.
    idle_since: Option<Instant>,
}

impl AdaptivePoll {
    /// `max` zero turns polling off.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            budget: Duration::ZERO,
            idle_since: None,
        }
    }

    /// How long to poll now.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// The most the budget may grow to.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The worker ran out of work at `now` (it starts polling, or goes to sleep). Repeated
    /// calls keep the first moment.
    pub fn idle(&mut self, now: Instant) {
        self.idle_since.get_or_insert(now);
    }

    /// The worker found work at `now`, by polling or because an event woke it: adapt the
    /// budget to how long it was idle.
    pub fn found_work(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let idle = now.saturating_duration_since(since);
        if idle <= self.budget {
            // The poll found it: keep the budget.
        } else if idle <= self.max {
            // Slept, but work came soon enough that polling would have caught it.
            self.budget = (self.budget * 2).clamp(MIN_BUDGET, self.max);
        } else {
            // Quiet: polling would have been wasted.
            self.budget = Duration::ZERO;
        }
    }

    /// The worker was stopped or restarted: forget the history.
    pub fn reset(&mut self) {
        self.budget = Duration::ZERO;
        self.idle_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn off_stays_off() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        let t = Instant::now();
        for i in 0..10 {
            p.idle(t + us(i * 10));
            p.found_work(t + us(i * 10 + 1));
            assert_eq!(p.budget(), Duration::ZERO);
        }
    }

    #[test]
    fn grows_while_work_comes_soon_and_caps_at_max() {
        let mut p = AdaptivePoll::new(us(32));
        let t = Instant::now();
        let mut seen = Vec::new();
        for i in 0..8 {
            let at = t + us(i * 100);
            p.idle(at);
            p.found_work(at + us(20));
            seen.push(p.budget().as_micros());
        }
        // 20 us idle: grows until the poll would catch it, then holds.
        assert_eq!(seen, [4, 8, 16, 32, 32, 32, 32, 32]);
    }

    #[test]
    fn poll_hits_keep_the_budget_and_a_long_sleep_drops_it() {
        let mut p = AdaptivePoll::new(us(50));
        let t = Instant::now();
        for i in 0..4 {
            p.idle(t + us(i * 100));
            p.found_work(t + us(i * 100 + 30));
        }
        assert_eq!(p.budget(), us(32));
        // Hits within the budget change nothing.
        p.idle(t + us(500));
        p.found_work(t + us(510));
        assert_eq!(p.budget(), us(32));
        // A longer idle than the maximum: back to sleeping at once.
        p.idle(t + us(600));
        p.found_work(t + us(1600));
        assert_eq!(p.budget(), Duration::ZERO);
    }

    #[test]
    fn idle_keeps_the_first_moment() {
        let mut p = AdaptivePoll::new(us(10));
        let t = Instant::now();
        p.idle(t);
        p.idle(t + us(100));
        p.found_work(t + us(105));
        // 105 us since the first idle: longer than the maximum.
        assert_eq!(p.budget(), Duration::ZERO);
        p.found_work(t + us(200)); // no idle in between: no change
        assert_eq!(p.budget(), Duration::ZERO);
    }

    #[test]
    fn reset_forgets() {
        let mut p = AdaptivePoll::new(us(10));
        let t = Instant::now();
        p.idle(t);
        p.found_work(t + us(1));
        assert_eq!(p.budget(), us(4));
        p.idle(t + us(2));
        p.reset();
        p.found_work(t + us(1000));
        assert_eq!(p.budget(), Duration::ZERO);
    }
}
