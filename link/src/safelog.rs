//! Safe logging (as Tor's `SafeLogging`): what would tell who talks to
//! whom (a destination host or port, a client's address) is written to logs
//! and error messages as `[scrubbed]`, at every level, unless the operator
//! turns unsafe logging on (`unsafe_logging = true` in the client's or the
//! relay's configuration) to debug a problem.
//!
//! ```
//! use allium_link::safelog::{Sensitive, set_unsafe_logging};
//!
//! let target = Sensitive("example.com:443");
//! assert_eq!(format!("to {target}"), "to [scrubbed]");
//! set_unsafe_logging(true);
//! assert_eq!(format!("to {target}"), "to example.com:443");
//! set_unsafe_logging(false);
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static UNSAFE: AtomicBool = AtomicBool::new(false);

/// Show sensitive values in logs from now on (for the whole process).
pub fn set_unsafe_logging(on: bool) {
    UNSAFE.store(on, Ordering::Relaxed);
}

/// A value shown only when unsafe logging is on.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive<T>(pub T);

impl<T: fmt::Display> fmt::Display for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if UNSAFE.load(Ordering::Relaxed) {
            self.0.fmt(f)
        } else {
            f.write_str("[scrubbed]")
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if UNSAFE.load(Ordering::Relaxed) {
            self.0.fmt(f)
        } else {
            f.write_str("[scrubbed]")
        }
    }
}
