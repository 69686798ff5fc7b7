//! Value parsers for numeric flags that refuse what is out of range in
//! plain words ("at least 16 MiB"), where clap's own range check would say
//! "3 is not in 16..18446744073709551615".

fn number(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a whole number"))
}

fn within(s: &str, min: u64, max: u64, unit: &str) -> Result<u64, String> {
    let n = number(s)?;
    match (n < min, n > max) {
        (true, _) if max == u64::MAX => Err(format!("must be at least {min}{unit} (got {n})")),
        (false, false) => Ok(n),
        _ => Err(format!("must be between {min} and {max}{unit} (got {n})")),
    }
}

/// The block cache's budget: at least 16 MiB (a few blocks per reader).
pub fn cache_mib(s: &str) -> Result<u64, String> {
    within(s, 16, u64::MAX, " MiB")
}

/// FUSE worker threads.
pub fn threads(s: &str) -> Result<u64, String> {
    within(s, 1, 64, " threads")
}

/// A number of seconds, at least one.
pub fn seconds(s: &str) -> Result<u64, String> {
    within(s, 1, u64::MAX, " s")
}

/// Seconds to wait on the store for one request: 1 s to an hour.
pub fn store_timeout(s: &str) -> Result<u64, String> {
    within(s, 1, 3600, " s")
}

/// Attempts per store request, the first included.
pub fn attempts(s: &str) -> Result<u32, String> {
    within(s, 1, 20, " attempts").map(|n| n as u32)
}

/// Permission bits in octal, as chmod takes them (`644`, `0755`).
pub fn octal_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim();
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode (like 644 or 0755)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_are_refused_in_words() {
        assert_eq!(cache_mib("64"), Ok(64));
        assert_eq!(
            cache_mib("3").unwrap_err(),
            "must be at least 16 MiB (got 3)"
        );
        assert_eq!(
            threads("65").unwrap_err(),
            "must be between 1 and 64 threads (got 65)"
        );
        assert_eq!(
            threads("0").unwrap_err(),
            "must be between 1 and 64 threads (got 0)"
        );
        assert_eq!(attempts("20"), Ok(20));
        assert_eq!(seconds("x").unwrap_err(), "\"x\" is not a whole number");
        assert_eq!(seconds("-1").unwrap_err(), "\"-1\" is not a whole number");
        assert_eq!(octal_mode("0755"), Ok(0o755));
        assert!(octal_mode("9").is_err() && octal_mode("17777").is_err());
    }
}
