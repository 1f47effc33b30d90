//! One bounded run of a child process: input on stdin, a wall-clock deadline, and stdout /
//! stderr read up to a byte cap. Whatever the child does — hang, crash, flood its output,
//! print bytes that are not UTF-8 — the call returns within the deadline (plus the time to
//! kill it) with a [`RunOutcome`] saying what happened; nothing here panics or blocks.
//!
//! The child is started in its own process group and killed with it (the external reward's
//! `kill_tree`), so a `sh -c` wrapper does not leave its children running.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::reward::external::kill_tree;

/// What a bounded run produced.
#[derive(Debug)]
pub(crate) struct RunOutcome {
    /// The first `max_output_bytes` bytes of stdout.
    pub stdout: Vec<u8>,
    /// The first `max_output_bytes` bytes of stderr.
    pub stderr: Vec<u8>,
    /// Whether stdout or stderr was longer than the cap (the child was then killed).
    pub truncated: bool,
    /// The exit status; `None` when the child was killed (deadline or flood).
    pub status: Option<ExitStatus>,
    /// Whether the deadline passed.
    pub timed_out: bool,
}

/// Reads at most `cap` bytes of `source` on a new thread; the second value says whether more
/// was available. The thread ends when the source closes (the child exits or is killed).
fn read_capped<R: Read + Send + 'static>(
    mut source: R,
    cap: usize,
) -> mpsc::Receiver<std::io::Result<(Vec<u8>, bool)>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let result = (&mut source)
            .take(cap as u64 + 1)
            .read_to_end(&mut buf)
            .map(|_| {
                let more = buf.len() > cap;
                buf.truncate(cap);
                (buf, more)
            });
        let _ = tx.send(result);
        // Drain the rest so that a flooding child never blocks on a full pipe before it is
        // killed (the bytes are dropped).
        let _ = std::io::copy(&mut source, &mut std::io::sink());
    });
    rx
}

/// Spawns `command` (its stdin, stdout and stderr are piped here, in a new process group),
/// writes `input` to its stdin, and waits at most `timeout`. Output beyond `max_output_bytes`
/// (on either stream) kills the child.
pub(crate) fn run_bounded(
    mut command: Command,
    input: Vec<u8>,
    timeout: Duration,
    max_output_bytes: usize,
) -> std::io::Result<RunOutcome> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let deadline = Instant::now() + timeout;
    let mut child: Child = command.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        // A child may exit without reading its input: a broken pipe is not an error here.
        thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill_tree(&mut child);
        return Err(std::io::Error::other("the child's output is not piped"));
    };
    let stdout_rx = read_capped(stdout, max_output_bytes);
    let stderr_rx = read_capped(stderr, max_output_bytes);

    let mut outcome = RunOutcome {
        stdout: Vec::new(),
        stderr: Vec::new(),
        truncated: false,
        status: None,
        timed_out: false,
    };
    let mut got = [false, false];
    loop {
        for (k, rx) in [&stdout_rx, &stderr_rx].into_iter().enumerate() {
            if got[k] {
                continue;
            }
            if let Ok(result) = rx.try_recv() {
                got[k] = true;
                let (bytes, more) = result.unwrap_or_default();
                outcome.truncated |= more;
                if k == 0 {
                    outcome.stdout = bytes;
                } else {
                    outcome.stderr = bytes;
                }
            }
        }
        if outcome.truncated {
            kill_tree(&mut child);
            return Ok(outcome);
        }
        if got == [true, true] {
            if let Some(status) = child.try_wait()? {
                outcome.status = Some(status);
                return Ok(outcome);
            }
        }
        if Instant::now() >= deadline {
            kill_tree(&mut child);
            outcome.timed_out = true;
            return Ok(outcome);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn echoes_input_and_reports_status() {
        let out = run_bounded(
            sh("cat; exit 3"),
            b"hi".to_vec(),
            Duration::from_secs(5),
            100,
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi");
        assert_eq!(out.status.and_then(|s| s.code()), Some(3));
        assert!(!out.timed_out && !out.truncated);
    }

    #[test]
    fn a_hang_ends_at_the_deadline_with_its_children() {
        let t0 = Instant::now();
        let out = run_bounded(
            sh("sleep 30 & sleep 30"),
            Vec::new(),
            Duration::from_millis(200),
            100,
        )
        .unwrap();
        assert!(out.timed_out && out.status.is_none());
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[test]
    fn a_flood_is_capped_and_killed() {
        let t0 = Instant::now();
        let out = run_bounded(sh("yes"), Vec::new(), Duration::from_secs(20), 1000).unwrap();
        assert!(out.truncated);
        assert_eq!(out.stdout.len(), 1000);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }
}
