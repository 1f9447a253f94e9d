//! Measurements of traces, for validating generators against arrival curves.

/// Maximum number of `releases` (sorted ascending) inside any half-open
/// window `[t, t + delta)`; 0 when `delta <= 0`.
pub fn max_events_in_window(releases: &[i64], delta: i64) -> usize {
    assert!(releases.windows(2).all(|w| w[0] <= w[1]), "max_events_in_window: releases must be sorted");
    if delta <= 0 {
        return 0;
    }
    // The densest window can always be taken to start at a release.
    let mut best = 0;
    let mut hi = 0;
    for (lo, &start) in releases.iter().enumerate() {
        while hi < releases.len() && releases[hi] - start < delta {
            hi += 1;
        }
        best = best.max(hi - lo);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        let r = [0, 1, 1, 5, 9, 10];
        assert_eq!(max_events_in_window(&r, 0), 0);
        assert_eq!(max_events_in_window(&r, 1), 2);
        assert_eq!(max_events_in_window(&r, 2), 3);
        assert_eq!(max_events_in_window(&r, 5), 3);
        assert_eq!(max_events_in_window(&r, 6), 4);
        assert_eq!(max_events_in_window(&r, 11), 6);
        assert_eq!(max_events_in_window(&[], 11), 0);
    }
}
