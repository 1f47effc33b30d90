//! A reward computed by an external program, once per batch.
//!
//! Protocol: the program is started once per batch. It receives on stdin one JSON object per
//! completion, one per line, in batch order:
//!
//! ```text
//! {"prompt": "...", "completion": "...", "answer": "..." | null}
//! ```
//!
//! and must write on stdout exactly one line per input line, in the same order, each either a
//! JSON number (`0.5`) or an object with a numeric `reward` field (`{"reward": 0.5}`), then
//! exit with status 0. A program that takes longer than the timeout is killed (on Unix with
//! its whole process group, so a `sh -c` wrapper does not leave its children running).

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{Reward, RewardInput};

/// Options of [`ExternalReward`] as written in a reward config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalOptions {
    /// The program followed by its arguments, e.g. `["python3", "score.py"]`.
    pub command: Vec<String>,
    /// Seconds the program may run per batch before it is killed.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: f64,
    /// Name for logs (defaults to `external`).
    #[serde(default)]
    pub name: Option<String>,
}

fn default_timeout_secs() -> f64 {
    60.0
}

/// Bytes of the program's stderr quoted in error messages (its tail).
const STDERR_TAIL_BYTES: usize = 2000;

/// Scores read from an external program speaking JSON lines (see the module docs).
#[derive(Debug, Clone)]
pub struct ExternalReward {
    name: String,
    program: String,
    args: Vec<String>,
    timeout: Duration,
}

/// One line of the program's stdin.
#[derive(Serialize)]
struct ExternalRequest<'a> {
    prompt: &'a str,
    completion: &'a str,
    answer: Option<&'a str>,
}

impl ExternalReward {
    /// A reward that runs `program args…` with the given per-batch timeout.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<String>,
        args: Vec<String>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let program = program.into();
        anyhow::ensure!(
            !program.is_empty(),
            "external reward: the program name is empty"
        );
        anyhow::ensure!(
            !timeout.is_zero(),
            "external reward `{program}`: timeout must be > 0"
        );
        Ok(Self {
            name: name.into(),
            program,
            args,
            timeout,
        })
    }

    /// Builds the reward from config options.
    pub fn from_options(options: &ExternalOptions) -> anyhow::Result<Self> {
        let (program, args) = options
            .command
            .split_first()
            .context("external reward: `command` is empty; give the program and its arguments")?;
        anyhow::ensure!(
            options.timeout_secs.is_finite() && options.timeout_secs > 0.0,
            "external reward `{program}`: timeout_secs must be a positive number, got {}",
            options.timeout_secs
        );
        Self::new(
            options
                .name
                .clone()
                .unwrap_or_else(|| "external".to_string()),
            program.clone(),
            args.to_vec(),
            Duration::from_secs_f64(options.timeout_secs),
        )
    }

    /// The command line as text, for messages.
    pub fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| {
                if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '\'') {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn spawn(&self) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        command
            .spawn()
            .with_context(|| format!("external reward: cannot start `{}`", self.command_line()))
    }

    /// Runs the program on `input` and returns its stdout, or an error on timeout,
    /// failure to start, or a non-zero exit status.
    fn run(&self, input: Vec<u8>) -> anyhow::Result<String> {
        let deadline = Instant::now() + self.timeout;
        let mut child = self.spawn()?;
        let cmd = self.command_line();

        let mut stdin = child.stdin.take().context("child stdin is not piped")?;
        // A program may exit without reading all of stdin; the broken pipe is then not an
        // error by itself (a short answer will be reported when its output is parsed).
        thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let stdout_rx =
            read_all_in_thread(child.stdout.take().context("child stdout is not piped")?);
        let stderr_rx =
            read_all_in_thread(child.stderr.take().context("child stderr is not piped")?);

        let timed_out = |child: &mut Child| -> anyhow::Error {
            kill_tree(child);
            anyhow::anyhow!(
                "external reward `{cmd}` timed out after {:.3} s and was killed",
                self.timeout.as_secs_f64()
            )
        };

        let stdout = match stdout_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                kill_tree(&mut child);
                return Err(e).with_context(|| format!("external reward `{cmd}`: reading stdout"));
            }
            Err(_) => return Err(timed_out(&mut child)),
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    kill_tree(&mut child);
                    return Err(e)
                        .with_context(|| format!("external reward `{cmd}`: waiting for it"));
                }
            }
            if Instant::now() >= deadline {
                return Err(timed_out(&mut child));
            }
            thread::sleep(Duration::from_millis(2));
        };
        if !status.success() {
            let stderr = stderr_rx
                .recv_timeout(Duration::from_millis(200))
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let tail_start = stderr.len().saturating_sub(STDERR_TAIL_BYTES);
            anyhow::bail!(
                "external reward `{cmd}` failed with {status}; stderr: {}",
                String::from_utf8_lossy(&stderr[tail_start..]).trim()
            );
        }
        String::from_utf8(stdout)
            .map_err(|e| anyhow::anyhow!("external reward `{cmd}`: stdout is not UTF-8: {e}"))
    }
}

/// Reads `source` to its end on a new thread; the result arrives on the returned channel.
fn read_all_in_thread<R: Read + Send + 'static>(
    mut source: R,
) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let result = source.read_to_end(&mut buf).map(|_| buf);
        let _ = tx.send(result);
    });
    rx
}

/// Kills the child and (on Unix) every process of its process group, then reaps the child.
pub(crate) fn kill_tree(child: &mut Child) {
    #[cfg(unix)]
    {
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group the child leads
            // (it was spawned with process_group(0)); no memory is touched.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Parses one stdout line: a JSON number or `{"reward": number}`.
fn parse_score(line: &str) -> anyhow::Result<f32> {
    let value: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| anyhow::anyhow!("not JSON ({e})"))?;
    let number = match &value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::Object(map) => match map.get("reward") {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(other) => anyhow::bail!("field `reward` is {other}, not a number"),
            None => anyhow::bail!("object has no `reward` field"),
        },
        other => anyhow::bail!("expected a number or {{\"reward\": number}}, got {other}"),
    };
    let score = number.context("number out of range")? as f32;
    anyhow::ensure!(score.is_finite(), "reward {line} does not fit in an f32");
    Ok(score)
}

impl Reward for ExternalReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut input = Vec::new();
        for item in batch {
            let request = ExternalRequest {
                prompt: &item.prompt,
                completion: &item.completion,
                answer: item.answer.as_deref(),
            };
            serde_json::to_writer(&mut input, &request)?;
            input.push(b'\n');
        }
        let stdout = self.run(input)?;
        let cmd = self.command_line();
        let lines: Vec<&str> = stdout.lines().collect();
        anyhow::ensure!(
            lines.len() == batch.len(),
            "external reward `{cmd}` wrote {} lines on stdout for a batch of {} completions \
             (one JSON number per input line expected)",
            lines.len(),
            batch.len()
        );
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                parse_score(line).with_context(|| {
                    format!("external reward `{cmd}`: stdout line {}: `{line}`", i + 1)
                })
            })
            .collect()
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str, timeout_secs: f64) -> ExternalReward {
        ExternalReward::from_options(&ExternalOptions {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_secs,
            name: None,
        })
        .unwrap()
    }

    fn batch(completions: &[&str]) -> Vec<RewardInput> {
        completions
            .iter()
            .map(|c| RewardInput {
                prompt: "p \"quoted\"\nline".into(),
                completion: c.to_string(),
                answer: Some("42".into()),
                completion_tokens: 1,
                columns: Default::default(),
            })
            .collect()
    }

    #[test]
    fn numbers_and_objects_in_order() {
        // Line k (1-based) gets k/2; even lines are written as {"reward": k/2}.
        let r = sh(
            r#"awk '{ if (NR % 2) print NR/2; else printf "{\"reward\": %s}\n", NR/2 }'"#,
            10.0,
        );
        let got = r.score(&batch(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(got, vec![0.5, 1.0, 1.5, 2.0]);
        assert_eq!(r.name(), "external");
    }

    #[test]
    fn child_sees_one_json_object_per_line() {
        // 1 when the line is exactly the expected JSON for completion "good", else 0.
        let script = r#"while IFS= read -r line; do
            if [ "$line" = '{"prompt":"p \"quoted\"\nline","completion":"good","answer":"42"}' ]; then
                echo 1; else echo 0; fi
        done"#;
        let got = sh(script, 10.0)
            .score(&batch(&["good", "bad", "good"]))
            .unwrap();
        assert_eq!(got, vec![1.0, 0.0, 1.0]);
    }

    #[test]
    fn empty_batch_runs_nothing() {
        let r = sh("exit 1", 10.0);
        assert!(r.score(&[]).unwrap().is_empty());
    }

    #[test]
    fn timeout_kills_and_names_the_command() {
        let r = sh("sleep 30", 0.3);
        let start = Instant::now();
        let err = r.score(&batch(&["a"])).unwrap_err().to_string();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
        assert!(
            err.contains("timed out") && err.contains("sleep 30"),
            "{err}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn timeout_also_kills_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > '{}'; wait", pid_file.display());
        let err = sh(&script, 0.5)
            .score(&batch(&["a"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_string();
        // Killed: gone, or a zombie waiting for init to reap it.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.split(") ").nth(1).unwrap_or("").starts_with('Z'))
                .unwrap_or(false)
        };
        let start = Instant::now();
        while alive() && start.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(), "grandchild {pid} survived the timeout");
    }

    #[test]
    fn malformed_line_is_named() {
        let r = sh("cat >/dev/null; echo 1; echo oops; echo 3", 10.0);
        let err = format!("{:#}", r.score(&batch(&["a", "b", "c"])).unwrap_err());
        assert!(
            err.contains("stdout line 2") && err.contains("oops"),
            "{err}"
        );
        let r = sh(r#"cat >/dev/null; echo 1; echo '{"score": 2}'"#, 10.0);
        let err = format!("{:#}", r.score(&batch(&["a", "b"])).unwrap_err());
        assert!(
            err.contains("stdout line 2") && err.contains("reward"),
            "{err}"
        );
    }

    #[test]
    fn wrong_line_count_is_an_error() {
        let r = sh("cat >/dev/null; echo 1", 10.0);
        let err = r.score(&batch(&["a", "b"])).unwrap_err().to_string();
        assert!(
            err.contains("wrote 1 lines") && err.contains("batch of 2"),
            "{err}"
        );
    }

    #[test]
    fn failing_program_reports_status_and_stderr() {
        let r = sh("cat >/dev/null; echo broken >&2; exit 3", 10.0);
        let err = r.score(&batch(&["a"])).unwrap_err().to_string();
        assert!(err.contains("broken") && err.contains('3'), "{err}");
        let missing =
            ExternalReward::new("x", "/nonexistent/program", vec![], Duration::from_secs(1))
                .unwrap();
        let err = missing.score(&batch(&["a"])).unwrap_err().to_string();
        assert!(
            err.contains("cannot start") && err.contains("/nonexistent/program"),
            "{err}"
        );
    }

    #[test]
    fn bad_options_are_rejected() {
        let empty = ExternalOptions {
            command: vec![],
            timeout_secs: 1.0,
            name: None,
        };
        assert!(ExternalReward::from_options(&empty).is_err());
        let zero = ExternalOptions {
            command: vec!["true".into()],
            timeout_secs: 0.0,
            name: None,
        };
        assert!(ExternalReward::from_options(&zero).is_err());
    }
}
