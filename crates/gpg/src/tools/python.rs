//! The built-in Python interpreter: `{"code": "print(2**100)"}` runs the code with `python3`
//! in a sandbox of limits and answers with what it printed.
//!
//! Each call runs `python3 -I main.py` (isolated mode: no user site, no `PYTHON*` variables) in
//! a fresh temporary directory that is removed afterwards, with an empty environment (PATH,
//! HOME = the directory, LANG only: nothing of the trainer's environment, no secrets), stdin
//! empty, and limits set with setrlimit before `exec` (Unix): CPU seconds (`cpu_secs`),
//! address space (`memory_mb`), file size (16 MiB), open files (64), no core dumps. The
//! `[tools]` wall-clock `timeout_secs` and `max_output_bytes` bound it from the outside (the
//! process group is killed). This bounds resources; it is not a security boundary against
//! hostile code (the process can still read world-readable files and open sockets): run
//! untrusted models' code in a container.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::process::run_bounded;
use super::{Limits, Tool};

/// Options of the `python` tool (`options = {...}` in the recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PythonOptions {
    /// The interpreter (default `python3`, looked up on PATH).
    pub python: String,
    /// CPU seconds per call (RLIMIT_CPU).
    pub cpu_secs: u64,
    /// Address space per call in MiB (RLIMIT_AS).
    pub memory_mb: u64,
}

impl Default for PythonOptions {
    fn default() -> Self {
        Self {
            python: "python3".into(),
            cpu_secs: 5,
            memory_mb: 1024,
        }
    }
}

/// The Python tool.
#[derive(Debug, Clone)]
pub struct Python {
    options: PythonOptions,
    limits: Limits,
}

/// Bytes of stderr quoted when the code fails (its tail: the traceback's end).
const STDERR_TAIL: usize = 800;

impl Python {
    /// Checks, at the start of a run, that the interpreter can be started.
    pub fn new(options: PythonOptions, limits: Limits) -> anyhow::Result<Self> {
        anyhow::ensure!(
            options.cpu_secs > 0 && options.memory_mb >= 16,
            "[tools] python: cpu_secs must be ≥ 1 and memory_mb ≥ 16"
        );
        let out = Command::new(&options.python)
            .arg("--version")
            .output()
            .with_context(|| {
                format!(
                    "[tools] lists the `python` tool, but `{}` cannot be started; install \
                     Python 3 (or set options.python to its path) or remove the tool from the \
                     recipe",
                    options.python
                )
            })?;
        let version = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(
            out.status.success() && version.contains("Python 3"),
            "[tools] python: `{} --version` says {:?}; Python 3 is needed",
            options.python,
            version.trim()
        );
        Ok(Self { options, limits })
    }

    fn run(&self, code: &str) -> Result<String, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "gpg-rl-python-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            std::fs::write(dir.join("main.py"), code)
                .map_err(|e| format!("cannot write the code: {e}"))?;
            let mut command = Command::new(&self.options.python);
            command
                .arg("-I")
                .arg("main.py")
                .current_dir(&dir)
                .env_clear()
                .env("PATH", "/usr/local/bin:/usr/bin:/bin")
                .env("HOME", &dir)
                .env("LANG", "C.UTF-8")
                .env("PYTHONDONTWRITEBYTECODE", "1");
            #[cfg(unix)]
            {
                use std::os::unix::process::CommandExt;
                let cpu = self.options.cpu_secs;
                let memory = self.options.memory_mb * 1024 * 1024;
                // SAFETY: the closure runs in the child between fork and exec and only calls
                // setrlimit(2), which is async-signal-safe; it allocates nothing.
                unsafe {
                    command.pre_exec(move || {
                        let set = |resource, value: u64| {
                            let limit = libc::rlimit {
                                rlim_cur: value as libc::rlim_t,
                                rlim_max: value as libc::rlim_t,
                            };
                            if libc::setrlimit(resource, &limit) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        };
                        set(libc::RLIMIT_CPU, cpu)?;
                        set(libc::RLIMIT_AS, memory)?;
                        set(libc::RLIMIT_FSIZE, 16 * 1024 * 1024)?;
                        set(libc::RLIMIT_NOFILE, 64)?;
                        set(libc::RLIMIT_CORE, 0)?;
                        Ok(())
                    });
                }
            }
            let out = run_bounded(
                command,
                Vec::new(),
                self.limits.timeout,
                self.limits.max_output_bytes,
            )
            .map_err(|e| format!("cannot start {}: {e}", self.options.python))?;
            if out.timed_out {
                return Err(format!(
                    "timed out after {:.1} s",
                    self.limits.timeout.as_secs_f64()
                ));
            }
            if out.truncated {
                return Err(format!(
                    "output longer than {} bytes",
                    self.limits.max_output_bytes
                ));
            }
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            match out.status {
                Some(s) if s.success() => Ok(stdout),
                status => {
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let mut cut = stderr.len().saturating_sub(STDERR_TAIL);
                    while !stderr.is_char_boundary(cut) {
                        cut += 1;
                    }
                    let how = match status {
                        Some(s) => s.to_string(),
                        None => "killed".into(),
                    };
                    Err(format!("{how}\n{stdout}{}", &stderr[cut..]))
                }
            }
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

impl Tool for Python {
    fn name(&self) -> &str {
        "python"
    }

    fn schema(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": "python",
                "description": "Run a Python 3 program and return what it prints (stdout).",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string", "description": "The program; print the result."}
                    },
                    "required": ["code"]
                }
            }
        })
    }

    fn call(&self, arguments: &Map<String, Value>) -> Result<String, String> {
        match arguments.get("code") {
            Some(Value::String(code)) => self.run(code),
            Some(other) => Err(format!("\"code\" must be a string, got {other}")),
            None => Err("missing argument \"code\"".into()),
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(timeout_ms: u64) -> Limits {
        Limits {
            timeout: Duration::from_millis(timeout_ms),
            max_output_bytes: 1000,
        }
    }

    fn python(timeout_ms: u64) -> Option<Python> {
        // The test machine may lack Python: then only the refusal is checked.
        Python::new(PythonOptions::default(), limits(timeout_ms)).ok()
    }

    fn call(p: &Python, code: &str) -> Result<String, String> {
        p.call(json!({ "code": code }).as_object().unwrap())
    }

    #[test]
    fn runs_code_within_limits() {
        let Some(p) = python(10_000) else { return };
        assert_eq!(
            call(&p, "print(2**100)").unwrap().trim(),
            "1267650600228229401496703205376"
        );
        // No secret of the trainer's environment reaches the code.
        std::env::set_var("GPG_RL_TEST_SECRET", "hunter2");
        let env = call(&p, "import os; print(sorted(os.environ))").unwrap();
        assert!(!env.contains("GPG_RL_TEST_SECRET"), "{env}");
        // A crash answers with the traceback's end.
        let err = call(&p, "1/0").unwrap_err();
        assert!(err.contains("ZeroDivisionError"), "{err}");
        // A flood is capped.
        let err = call(&p, "print('x' * 100000)").unwrap_err();
        assert!(err.contains("longer than 1000 bytes"), "{err}");
        // Memory beyond the limit fails inside Python.
        let err = call(&p, "x = bytearray(4 * 1024**3)").unwrap_err();
        assert!(err.contains("MemoryError"), "{err}");
    }

    #[test]
    fn a_hang_times_out() {
        let Some(p) = python(300) else { return };
        let t0 = std::time::Instant::now();
        let err = call(&p, "while True: pass").unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn absent_interpreter_is_refused_at_start() {
        let err = Python::new(
            PythonOptions {
                python: "/nonexistent/python3".into(),
                ..Default::default()
            },
            limits(1000),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("cannot be started"), "{err:#}");
    }
}
