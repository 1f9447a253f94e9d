//! Quantities with units, parsed exactly (decimals never go through `f64`).
//!
//! Inside `rtc` time is in microseconds, sizes in bytes and bandwidth in bytes per microsecond.
//! Each parser returns a plain message on error; the caller adds the file, line and item.

use rtc::Q;

/// Largest magnitude accepted for a time (µs) or a size (bytes): 10^12.
pub const MAX_MAGNITUDE: i64 = 1_000_000_000_000;

/// Splits `"10 ms"` into `("10", "ms")`: the number ends at the first letter or `µ`.
fn split(s: &str) -> (&str, &str) {
    let t = s.trim();
    let at = t.find(|c: char| c.is_alphabetic() || c == 'µ').unwrap_or(t.len());
    (t[..at].trim(), t[at..].trim())
}

fn number(n: &str, whole: &str) -> Result<Q, String> {
    if n.is_empty() {
        return Err(format!("{whole:?} has no number"));
    }
    n.parse::<Q>().map_err(|_| format!("{whole:?}: {n:?} is not an exact number (write e.g. 2.5 or 7/3)"))
}

fn check_magnitude(v: &Q, whole: &str, unit: &str) -> Result<(), String> {
    if v.abs() > Q::int(MAX_MAGNITUDE) {
        return Err(format!("{whole:?} is too large (more than 10^12 {unit})"));
    }
    Ok(())
}

/// A time such as `"10ms"`, `"250us"`, `"2s"`, `"800ns"`, `"1.5ms"`, in microseconds.
/// Negative values parse (validation reports them with context); the resolution is 1 ps.
pub fn time(s: &str) -> Result<Q, String> {
    let (n, u) = split(s);
    let scale = match u {
        "s" => Q::int(1_000_000),
        "ms" => Q::int(1_000),
        "us" | "µs" => Q::one(),
        "ns" => Q::new(1, 1_000).unwrap_or_default(),
        "ps" => Q::new(1, 1_000_000).unwrap_or_default(),
        "" => return Err(format!("{s:?} has no unit (write e.g. \"10ms\", \"250us\", \"2s\", \"800ns\")")),
        _ => return Err(format!("{s:?}: unknown time unit {u:?} (use s, ms, us, ns)")),
    };
    let v = number(n, s)? * scale;
    check_magnitude(&v, s, "µs")?;
    // Denominators up to 10^6 µs (1 ps, or fractions such as 1/3 ms) keep the analysis fast.
    let den_ok = v.is_integer()
        || match v.to_string().split_once('/') {
            None => true,
            Some((_, d)) => d.parse::<u64>().is_ok_and(|d| d <= 1_000_000),
        };
    if !den_ok {
        return Err(format!("{s:?} is finer than the resolution of 1 ps"));
    }
    Ok(v)
}

/// A size such as `"1500B"`, `"64KiB"`, `"1kB"` (= 1000 B), in bytes.
pub fn size(s: &str) -> Result<Q, String> {
    let (n, u) = split(s);
    let scale: i64 = match u {
        "B" | "byte" | "bytes" => 1,
        "kB" | "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "" => return Err(format!("{s:?} has no unit (write e.g. \"1500B\", \"64KiB\", \"1kB\")")),
        _ => return Err(format!("{s:?}: unknown size unit {u:?} (use B, kB, KiB, MB, MiB, GB, GiB)")),
    };
    let v = number(n, s)? * Q::int(scale);
    check_magnitude(&v, s, "bytes")?;
    Ok(v)
}

/// A bandwidth such as `"100Mbit/s"`, `"1Gbit/s"`, `"12.5MB/s"`, `"100Mbps"`, in bytes per µs.
pub fn bandwidth(s: &str) -> Result<Q, String> {
    let (n, u) = split(s);
    let per_s = u.strip_suffix("/s").or_else(|| u.strip_suffix("ps").map(|p| if p.ends_with('b') { p } else { "?" }));
    let unit = match per_s {
        Some(p) => p,
        None if u.is_empty() => return Err(format!("{s:?} has no unit (write e.g. \"100Mbit/s\", \"12.5MB/s\")")),
        None => return Err(format!("{s:?}: a bandwidth is a size or bits per second (e.g. \"100Mbit/s\")")),
    };
    // Bytes per second for one unit, as (numerator, denominator).
    let (num, den): (i64, i64) = match unit {
        "bit" | "b" => (1, 8),
        "kbit" | "kb" | "Kbit" => (1_000, 8),
        "Mbit" | "Mb" => (1_000_000, 8),
        "Gbit" | "Gb" => (1_000_000_000, 8),
        "B" => (1, 1),
        "kB" | "KB" => (1_000, 1),
        "KiB" => (1 << 10, 1),
        "MB" => (1_000_000, 1),
        "MiB" => (1 << 20, 1),
        "GB" => (1_000_000_000, 1),
        "GiB" => (1 << 30, 1),
        _ => {
            return Err(format!(
                "{s:?}: unknown bandwidth unit {u:?} (use bit/s, kbit/s, Mbit/s, Gbit/s, B/s, kB/s, MB/s, GB/s, KiB/s, MiB/s, GiB/s)"
            ))
        }
    };
    let per_unit = Q::new(num, den * 1_000_000).unwrap_or_default();
    let v = number(n, s)? * per_unit;
    check_magnitude(&v, s, "bytes/µs")?;
    Ok(v)
}

/// Formats a time in µs for humans: `1.5 ms`, `250 µs`, `2 s` (rounded; display only).
pub fn human_time(us: &Q) -> String {
    let v = us.to_f64();
    let a = v.abs();
    let (x, unit) = if a >= 1e6 {
        (v / 1e6, "s")
    } else if a >= 1e3 {
        (v / 1e3, "ms")
    } else if a >= 1.0 || a == 0.0 {
        (v, "µs")
    } else {
        (v * 1e3, "ns")
    };
    format!("{} {unit}", trim_float(x, 4))
}

/// Formats a size in bytes for humans, in binary units: `1.5 GiB`, `512 MiB`, `64 B`.
pub fn human_size(bytes: &Q) -> String {
    let v = bytes.to_f64();
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut k = 0;
    let mut x = v;
    while x.abs() >= 1024.0 && k + 1 < units.len() {
        x /= 1024.0;
        k += 1;
    }
    format!("{} {}", trim_float(x, 4), units[k])
}

/// `x` with at most `sig` significant digits, without trailing zeros.
pub fn trim_float(x: f64, sig: usize) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let mag = x.abs().log10().floor() as i64;
    let decimals = (sig as i64 - 1 - mag).clamp(0, 12) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Q {
        s.parse().unwrap()
    }

    #[test]
    fn times() {
        assert_eq!(time("10ms").unwrap(), q("10000"));
        assert_eq!(time("250us").unwrap(), q("250"));
        assert_eq!(time("250µs").unwrap(), q("250"));
        assert_eq!(time("2s").unwrap(), q("2000000"));
        assert_eq!(time("800ns").unwrap(), q("4/5"));
        assert_eq!(time("1.5ms").unwrap(), q("1500"));
        assert_eq!(time(" 1.5 ms ").unwrap(), q("1500"));
        assert_eq!(time("0.1ms").unwrap(), q("100"), "exact decimal, not via f64");
        assert_eq!(time("1/3ms").unwrap(), q("1000/3"));
        assert_eq!(time("-1ms").unwrap(), q("-1000"));
        assert_eq!(time("0ms").unwrap(), q("0"));
    }

    #[test]
    fn bad_times() {
        for (s, want) in [
            ("10 parsecs", "unknown time unit"),
            ("10", "no unit"),
            ("ms", "no number"),
            ("1.2.3ms", "not an exact number"),
            ("2000000000s", "too large"),
            ("0.0000001ns", "resolution"),
            ("", "no unit"),
        ] {
            let e = time(s).unwrap_err();
            assert!(e.contains(want), "{s:?}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("1500B").unwrap(), q("1500"));
        assert_eq!(size("64KiB").unwrap(), q("65536"));
        assert_eq!(size("1kB").unwrap(), q("1000"));
        assert_eq!(size("1.5MB").unwrap(), q("1500000"));
        assert!(size("12 furlongs").unwrap_err().contains("unknown size unit"));
        assert!(size("1500").unwrap_err().contains("no unit"));
        assert!(size("9999999GB").unwrap_err().contains("too large"));
    }

    #[test]
    fn bandwidths() {
        assert_eq!(bandwidth("100Mbit/s").unwrap(), q("25/2"));
        assert_eq!(bandwidth("1Gbit/s").unwrap(), q("125"));
        assert_eq!(bandwidth("12.5MB/s").unwrap(), q("25/2"));
        assert_eq!(bandwidth("100Mbps").unwrap(), q("25/2"));
        assert_eq!(bandwidth("8bit/s").unwrap(), q("1/1000000"));
        assert!(bandwidth("100Mbit").unwrap_err().contains("bits per second"));
        assert!(bandwidth("100 furlongs/s").unwrap_err().contains("unknown bandwidth unit"));
        assert!(bandwidth("100").unwrap_err().contains("no unit"));
    }

    #[test]
    fn human() {
        assert_eq!(human_time(&q("1500")), "1.5 ms");
        assert_eq!(human_time(&q("250")), "250 µs");
        assert_eq!(human_time(&q("2000000")), "2 s");
        assert_eq!(human_time(&q("1/3")), "333.3 ns");
        assert_eq!(human_time(&q("0")), "0 µs");
    }
}
