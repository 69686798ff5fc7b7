//! Times as `ls -l` prints them, in the local time zone (`TZ`, else
//! `/etc/localtime`): the C library's `localtime_r`, so sessionfs and GNU
//! `ls` agree on every zone and daylight-saving rule without a time-zone
//! database of our own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `ls`'s `--time-style`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeStyle {
    /// `Dec  1 10:42` within six months, `Dec  1  2025` otherwise (GNU's default).
    #[default]
    Locale,
    /// `12-01 10:42` within six months, `2025-12-01` otherwise.
    Iso,
    /// `2026-12-01 10:42`.
    LongIso,
    /// `2026-12-01 10:42:05.123456789 +0100`.
    FullIso,
}

extern "C" {
    /// POSIX; the libc crate does not declare it. glibc's `localtime_r`
    /// reads the zone only once without it.
    fn tzset();
}

struct Local {
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
    /// Seconds east of UTC.
    offset: i64,
}

fn local(t: SystemTime) -> Option<Local> {
    let secs: i64 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok()?,
        Err(e) => -i64::try_from(e.duration().as_secs()).ok()?,
    };
    let time = libc::time_t::try_from(secs).ok()?;
    // SAFETY: an all-zero `tm` is a valid value for localtime_r to fill.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: tzset only reads the environment and the zone files;
    // localtime_r writes into `tm`, which outlives the call, and is the
    // reentrant form (no shared static buffer).
    let filled = unsafe {
        tzset();
        !libc::localtime_r(&time, &mut tm).is_null()
    };
    filled.then(|| Local {
        year: tm.tm_year + 1900,
        month: tm.tm_mon as u32 + 1,
        day: tm.tm_mday as u32,
        hour: tm.tm_hour as u32,
        min: tm.tm_min as u32,
        sec: tm.tm_sec as u32,
        offset: tm.tm_gmtoff,
    })
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `t` as `ls -l --time-style=STYLE` prints it, `now` deciding what is
/// recent (GNU: within the last six months and not in the future).
pub fn format(t: SystemTime, style: TimeStyle, now: SystemTime) -> String {
    let Some(l) = local(t) else {
        return "?".into();
    };
    const HALF_YEAR: Duration = Duration::from_secs(31_556_952 / 2);
    let recent = t <= now && now.duration_since(t).is_ok_and(|age| age < HALF_YEAR);
    match style {
        TimeStyle::Locale if recent => format!(
            "{} {:>2} {:02}:{:02}",
            MONTHS[(l.month - 1) as usize % 12],
            l.day,
            l.hour,
            l.min
        ),
        TimeStyle::Locale => format!(
            "{} {:>2} {:>5}",
            MONTHS[(l.month - 1) as usize % 12],
            l.day,
            l.year
        ),
        TimeStyle::Iso if recent => {
            format!("{:02}-{:02} {:02}:{:02}", l.month, l.day, l.hour, l.min)
        }
        TimeStyle::Iso => format!("{:04}-{:02}-{:02} ", l.year, l.month, l.day),
        TimeStyle::LongIso => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}",
            l.year, l.month, l.day, l.hour, l.min
        ),
        TimeStyle::FullIso => {
            let nanos = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let (sign, off) = if l.offset < 0 {
                ('-', -l.offset)
            } else {
                ('+', l.offset)
            };
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{nanos:09} {sign}{:02}{:02}",
                l.year,
                l.month,
                l.day,
                l.hour,
                l.min,
                l.sec,
                off / 3600,
                off % 3600 / 60
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_print_as_gnu_ls_does_in_utc() {
        // The only test here that reads the zone.
        std::env::set_var("TZ", "UTC");
        let t = UNIX_EPOCH + Duration::new(1_764_584_525, 123_456_789); // 2025-12-01 10:22:05 UTC
        let soon = t + Duration::from_secs(3600);
        let later = t + Duration::from_secs(400 * 86_400);
        assert_eq!(format(t, TimeStyle::Locale, soon), "Dec  1 10:22");
        assert_eq!(format(t, TimeStyle::Locale, later), "Dec  1  2025");
        assert_eq!(format(t, TimeStyle::Iso, soon), "12-01 10:22");
        assert_eq!(format(t, TimeStyle::Iso, later), "2025-12-01 ");
        assert_eq!(format(t, TimeStyle::LongIso, later), "2025-12-01 10:22");
        assert_eq!(
            format(t, TimeStyle::FullIso, later),
            "2025-12-01 10:22:05.123456789 +0000"
        );
    }
}
