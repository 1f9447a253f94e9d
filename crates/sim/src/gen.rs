//! Generators of release traces (sorted `Vec<i64>` over `[0, horizon)`) and
//! execution times, driven by a tiny seedable PRNG.

/// Seedable splitmix64 pseudo-random generator (deterministic across platforms).
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish value in `[lo, hi]` (inclusive; multiply-shift reduction).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi, "Rng::range: empty range [{lo}, {hi}]");
        let span = (hi as i128 - lo as i128 + 1) as u128;
        let x = self.next_u64() as u128;
        if span > u64::MAX as u128 {
            return x as i64;
        }
        (lo as i128 + ((x * span) >> 64) as i128) as i64
    }
}

/// Strictly periodic releases `offset + k*period` in `[0, horizon)`.
pub fn periodic(period: i64, offset: i64, horizon: i64) -> Vec<i64> {
    assert!(period > 0, "periodic: period must be positive");
    assert!(offset >= 0, "periodic: offset must be non-negative");
    (0..).map(|k| offset + k * period).take_while(|&r| r < horizon).collect()
}

/// How [`pjd`] chooses jitters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JitterMode {
    /// Jitter drawn uniformly from `[0, jitter]` (then pushed later if needed
    /// for the minimum distance).
    Random,
    /// All jitters zero: releases at `k*period`.
    Zero,
    /// Worst-case burst: the first job is released maximally late (at
    /// `jitter`), all following jobs as early as allowed, so the densest
    /// possible burst forms at the start of the trace.
    Burst,
}

/// Period/jitter/minimum-distance trace: job `k` is released at
/// `k*period + j_k` with `j_k` in `[0, jitter]`, consecutive releases at
/// least `min_distance` apart (`1 <= min_distance <= period`). Any such
/// trace has at most `ceil((Δ+J)/P)` and `ceil(Δ/d)` releases in every
/// half-open window of length `Δ > 0`.
pub fn pjd(period: i64, jitter: i64, min_distance: i64, horizon: i64, rng: &mut Rng, mode: JitterMode) -> Vec<i64> {
    assert!(period > 0, "pjd: period must be positive");
    assert!(jitter >= 0, "pjd: jitter must be non-negative");
    assert!((1..=period).contains(&min_distance), "pjd: min_distance must be in [1, period]");
    let mut out: Vec<i64> = Vec::new();
    for k in 0.. {
        let base = k * period;
        if base >= horizon {
            break;
        }
        let wanted = match mode {
            JitterMode::Random => base + rng.range(0, jitter),
            JitterMode::Zero => base,
            JitterMode::Burst if k == 0 => jitter,
            JitterMode::Burst => base,
        };
        // Push forward for the minimum distance. This never leaves the jitter
        // window: prev + d <= (k-1)P + J + d <= kP + J because d <= P.
        let r = out.last().map_or(wanted, |&prev| wanted.max(prev + min_distance));
        debug_assert!(r <= base + jitter);
        if r >= horizon {
            break;
        }
        out.push(r);
    }
    out
}

/// Sporadic trace starting at 0 with gaps drawn from
/// `[min_distance, min_distance + max_extra_gap]`.
pub fn sporadic(min_distance: i64, max_extra_gap: i64, horizon: i64, rng: &mut Rng) -> Vec<i64> {
    assert!(min_distance >= 1, "sporadic: min_distance must be positive");
    assert!(max_extra_gap >= 0, "sporadic: max_extra_gap must be non-negative");
    let mut out = Vec::new();
    let mut r = 0;
    while r < horizon {
        out.push(r);
        r += min_distance + rng.range(0, max_extra_gap);
    }
    out
}

/// How [`exec_times`] chooses execution times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecMode {
    /// Uniform in `[bcet, wcet]`.
    Random,
    /// Every job takes `wcet`.
    Wcet,
    /// Every job takes `bcet`.
    Bcet,
}

/// `n` execution times in `[bcet, wcet]` (`0 <= bcet <= wcet`).
pub fn exec_times(n: usize, bcet: i64, wcet: i64, rng: &mut Rng, mode: ExecMode) -> Vec<i64> {
    assert!(0 <= bcet && bcet <= wcet, "exec_times: need 0 <= bcet <= wcet");
    (0..n)
        .map(|_| match mode {
            ExecMode::Random => rng.range(bcet, wcet),
            ExecMode::Wcet => wcet,
            ExecMode::Bcet => bcet,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::max_events_in_window;

    fn ceil_div(a: i64, b: i64) -> i64 {
        (a + b - 1).div_euclid(b)
    }

    #[test]
    fn rng_range_bounds_and_determinism() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        for _ in 0..1000 {
            let x = a.range(-3, 5);
            assert!((-3..=5).contains(&x));
            assert_eq!(x, b.range(-3, 5));
        }
        let mut seen = [false; 9];
        for _ in 0..1000 {
            seen[(a.range(-3, 5) + 3) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        let _ = a.range(i64::MIN, i64::MAX);
    }

    #[test]
    fn pjd_traces_respect_arrival_curves() {
        let mut rng = Rng::new(1);
        for seed in 0..300u64 {
            let mut r = Rng::new(seed);
            let p = r.range(1, 40);
            let j = r.range(0, 120);
            let d = r.range(1, p);
            let horizon = r.range(0, 3000);
            for mode in [JitterMode::Random, JitterMode::Zero, JitterMode::Burst] {
                let tr = pjd(p, j, d, horizon, &mut rng, mode);
                for (k, &x) in tr.iter().enumerate() {
                    let base = k as i64 * p;
                    assert!(base <= x && x <= base + j && x < horizon, "{mode:?} job {k}");
                    assert!(k == 0 || x - tr[k - 1] >= d);
                }
                assert_eq!(tr.len() as i64, ceil_div(horizon, p).min(tr.len() as i64));
                for delta in (1..4 * p + j).chain([7 * p + j]) {
                    let bound = ceil_div(delta + j, p).min(ceil_div(delta, d)) as usize;
                    assert!(max_events_in_window(&tr, delta) <= bound, "{mode:?} Δ={delta}");
                }
            }
        }
    }

    #[test]
    fn pjd_burst_is_tight() {
        let tr = pjd(10, 25, 2, 100, &mut Rng::new(0), JitterMode::Burst);
        assert_eq!(&tr[..5], &[25, 27, 29, 31, 40]);
        for delta in 1..40 {
            let bound = ceil_div(delta + 25, 10).min(ceil_div(delta, 2)) as usize;
            assert_eq!(max_events_in_window(&tr, delta), bound, "Δ={delta}");
        }
        assert_eq!(pjd(10, 25, 2, 35, &mut Rng::new(0), JitterMode::Zero), vec![0, 10, 20, 30]);
    }

    #[test]
    fn sporadic_and_exec_ranges() {
        let mut rng = Rng::new(9);
        let tr = sporadic(5, 3, 1000, &mut rng);
        assert_eq!(tr[0], 0);
        assert!(tr.windows(2).all(|w| (5..=8).contains(&(w[1] - w[0]))));
        assert!(*tr.last().unwrap_or(&0) < 1000);
        let ex = exec_times(100, 2, 4, &mut rng, ExecMode::Random);
        assert!(ex.iter().all(|e| (2..=4).contains(e)));
        assert_eq!(exec_times(3, 2, 4, &mut rng, ExecMode::Wcet), vec![4, 4, 4]);
        assert_eq!(periodic(4, 1, 14), vec![1, 5, 9, 13]);
    }
}
