//! PID 1's log: lines on stderr (the guest's console). Writing never
//! panics, whatever stderr is (a panic in PID 1 panics the guest kernel),
//! and lines are rate-limited, so no flood of errors fills the console:
//! past [`BURST`] lines in a [`WINDOW`] the rest are counted, and the count
//! is written with the next line that gets through.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BURST: u32 = 50;
pub const WINDOW: Duration = Duration::from_secs(1);

struct Limiter {
    window: Option<Instant>,
    written: u32,
    dropped: u64,
}

impl Limiter {
    /// Whether a line may be written now; if so, how many were dropped
    /// since the last one that was.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let mut dropped = 0;
        if self
            .window
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            dropped = std::mem::take(&mut self.dropped);
            self.window = Some(now);
            self.written = 0;
        }
        if self.written >= BURST {
            self.dropped += 1;
            return None;
        }
        self.written += 1;
        Some(dropped)
    }
}

static LIMITER: Mutex<Limiter> = Mutex::new(Limiter {
    window: None,
    written: 0,
    dropped: 0,
});

/// Writes one line, `banger-agent: ` first, unless the rate limit says no.
pub fn write(args: std::fmt::Arguments<'_>) {
    let admitted = LIMITER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .admit(Instant::now());
    let Some(dropped) = admitted else {
        return;
    };
    let mut stderr = std::io::stderr().lock();
    if dropped > 0 {
        let _ = writeln!(stderr, "banger-agent: ({dropped} log lines dropped)");
    }
    let _ = stderr.write_all(b"banger-agent: ");
    let _ = stderr.write_fmt(args);
    let _ = stderr.write_all(b"\n");
}

/// `log!("...", args)`: one line of PID 1's log (see [`write`]).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log::write(format_args!($($arg)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gets_through_and_the_rest_is_counted_for_the_next_window() {
        let mut limiter = Limiter {
            window: None,
            written: 0,
            dropped: 0,
        };
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limiter.admit(start), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limiter.admit(start), None);
        }
        assert_eq!(limiter.admit(start + WINDOW), Some(1000));
        assert_eq!(limiter.admit(start + WINDOW), Some(0));
    }
}
