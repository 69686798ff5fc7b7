//! Where log lines go and how they look. `tracing` to stderr: with a
//! timestamp and level for a person or a log file; for journald (stderr is
//! the journal's stream, `$JOURNAL_STREAM`) without the timestamp journald
//! adds itself and with the level as a syslog priority (`<4>` for a
//! warning), so `journalctl -p warning` filters them. Never colour codes,
//! and control characters in names from objects are escaped.
//!
//! The filter: `--log` (or `SESSIONFS_LOG`), else `RUST_LOG`, else
//! `warn,fuser=error`.

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

pub const DEFAULT_FILTER: &str = "warn,fuser=error";

/// The filter text to use, and where it came from (for error messages).
pub fn filter_text(flag: Option<String>) -> (String, &'static str) {
    match flag {
        Some(f) => (f, "--log"),
        None => match std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()) {
            Some(f) => (f, "RUST_LOG"),
            None => (DEFAULT_FILTER.to_owned(), "the default"),
        },
    }
}

/// The filter in force, replaceable while running (a configuration reload).
static FILTER: std::sync::OnceLock<reload::Handle<EnvFilter, Registry>> =
    std::sync::OnceLock::new();

/// Installs the subscriber for the whole process.
pub fn init(filter: EnvFilter) {
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let lines = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(|| EscapingStderr);
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        registry.with(lines.event_format(Journald)).init();
    } else {
        registry.with(lines).init();
    }
}

/// Replaces the filter in force.
pub fn set_filter(text: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(text).map_err(|e| format!("{text:?} is not a log filter ({e})"))?;
    FILTER
        .get()
        .ok_or("logging is not set up")?
        .reload(filter)
        .map_err(|e| e.to_string())
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for a service whose stderr is
/// the journal; the variable is inherited, so the stream must still be
/// stderr.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    want == format!("{}:{}", md.dev(), md.ino())
}

/// `<PRIORITY>target: message`, one line per event.
struct Journald;

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>{}: ", event.metadata().target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Standard error for log lines, their control characters escaped.
struct EscapingStderr;

impl std::io::Write for EscapingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let escaped = sessionfs_core::text::escape_log_line(buf);
        std::io::stderr().lock().write_all(&escaped)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
