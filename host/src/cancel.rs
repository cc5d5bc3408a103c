//! Making a cancel flag reach work blocked in a system call: a watcher thread that runs an
//! action (close a socket, shut a client down) once the flag is raised.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the watcher looks at the flag: bounds how long a signal waits.
const POLL: Duration = Duration::from_millis(100);

/// Runs `f` while a watcher calls `on_cancel` (once) as soon as `cancel` is raised.
pub fn watch<T>(cancel: &AtomicBool, on_cancel: impl FnOnce() + Send, f: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if cancel.load(Ordering::Relaxed) {
                    on_cancel();
                    return;
                }
                std::thread::park_timeout(POLL);
            }
        });
        let result = f();
        done.store(true, Ordering::Relaxed);
        watcher.thread().unpark();
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn the_action_runs_once_on_cancel_and_never_without() {
        let (cancel, ran) = (AtomicBool::new(false), AtomicUsize::new(0));
        assert_eq!(
            watch(
                &cancel,
                || {
                    ran.fetch_add(1, Ordering::Relaxed);
                },
                || 7
            ),
            7
        );
        assert_eq!(ran.load(Ordering::Relaxed), 0);
        let started = std::time::Instant::now();
        watch(
            &cancel,
            || {
                ran.fetch_add(1, Ordering::Relaxed);
            },
            || {
                cancel.store(true, Ordering::Relaxed);
                while ran.load(Ordering::Relaxed) == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            },
        );
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
