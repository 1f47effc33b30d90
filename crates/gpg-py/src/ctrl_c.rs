//! Ctrl-C during `gpg_rl.train`.
//!
//! While the trainer runs with the GIL released, Python's SIGINT handler only marks the signal
//! as pending; the KeyboardInterrupt would be raised at the next Python reward call, or never
//! when every reward is built in. (A watcher thread calling `Python::check_signals` would not
//! help: CPython runs signal handlers in the main thread only.) So for the run's duration a
//! [`Guard`] puts a SIGINT handler of its own in place, which sets the trainer's stop flag
//! ([`gpg::train::Trainer::stop_when`]: polled between steps and rollout rounds, never inside a
//! checkpoint write), and puts Python's handler back when dropped. A second Ctrl-C while the
//! run is stopping ends the process at once, as Ctrl-C does by default (the checkpoints are
//! written to a `.tmp` folder and renamed when complete, so none is left half-written).
//!
//! Several runs in progress at once (threads) share the handler and the flag: the first guard
//! installs the handler, the last one dropped restores Python's.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

/// The process's stop flag, set by the handler.
static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn flag() -> &'static Arc<AtomicBool> {
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Keeps the Ctrl-C handler in place for a run; see the module's documentation.
pub struct Guard(());

impl Guard {
    /// The run's stop flag (set by Ctrl-C while this guard lives).
    pub fn flag(&self) -> Arc<AtomicBool> {
        flag().clone()
    }
}

#[cfg(unix)]
mod imp {
    use std::sync::atomic::Ordering;
    use std::sync::{Mutex, MutexGuard};

    use super::{flag, Guard, FLAG};

    const MESSAGE: &[u8] =
        b"\nCtrl-C: stopping after the current rollout round or step (Ctrl-C again ends the process now)\n";

    /// The handler: async-signal-safe operations only (an atomic swap, write(2), signal(2),
    /// raise(3)).
    extern "C" fn on_sigint(_: libc::c_int) {
        let Some(flag) = FLAG.get() else { return };
        if flag.swap(true, Ordering::SeqCst) {
            // The second Ctrl-C: the default action (the process ends).
            unsafe {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::raise(libc::SIGINT);
            }
        } else {
            unsafe {
                libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            }
        }
    }

    /// The number of guards alive and the handler they replaced (Python's).
    struct Installed {
        guards: usize,
        previous: libc::sigaction,
    }

    static INSTALLED: Mutex<Option<Installed>> = Mutex::new(None);

    fn installed() -> MutexGuard<'static, Option<Installed>> {
        INSTALLED.lock().unwrap_or_else(|e| e.into_inner())
    }

    impl Guard {
        /// Puts the handler in place (the first guard) and clears the stop flag.
        pub fn install() -> std::io::Result<Guard> {
            let mut installed = installed();
            match installed.as_mut() {
                Some(state) => state.guards += 1,
                None => {
                    flag().store(false, Ordering::SeqCst);
                    // SAFETY: plain sigaction(2) calls on zero-initialised C structs; the
                    // handler does only async-signal-safe work.
                    let previous = unsafe {
                        let mut action: libc::sigaction = std::mem::zeroed();
                        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
                        action.sa_flags = libc::SA_RESTART;
                        libc::sigemptyset(&mut action.sa_mask);
                        let mut previous: libc::sigaction = std::mem::zeroed();
                        if libc::sigaction(libc::SIGINT, &action, &mut previous) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        previous
                    };
                    *installed = Some(Installed {
                        guards: 1,
                        previous,
                    });
                }
            }
            Ok(Guard(()))
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let mut installed = installed();
            if let Some(state) = installed.as_mut() {
                state.guards -= 1;
                if state.guards == 0 {
                    // SAFETY: restores the action sigaction(2) returned when installing.
                    unsafe {
                        libc::sigaction(libc::SIGINT, &state.previous, std::ptr::null_mut());
                    }
                    *installed = None;
                }
            }
        }
    }
}

#[cfg(not(unix))]
impl Guard {
    /// Elsewhere than Unix the flag stays clear: Ctrl-C is seen at the next Python reward call.
    pub fn install() -> std::io::Result<Guard> {
        flag().store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(Guard(()))
    }
}
