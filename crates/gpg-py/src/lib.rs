//! `gpg_rl._gpg_rl`: the extension module behind the `gpg_rl` Python package
//! (python/gpg_rl/__init__.py holds the documented, typed API; docs/python.md).
//!
//! Every function runs the same library code as the `gpg-rl` command line
//! (`gpg::commands`), with the GIL released while it runs. Python reward functions are handed
//! to the trainer as `in_process` rewards (`gpg::reward::in_process`): the trainer calls them
//! once per sampling round with the whole batch, taking the GIL only for that call. Values
//! cross the boundary as JSON text (the Python layer encodes and decodes it). Ctrl-C during a
//! run sets the trainer's stop flag (src/ctrl_c.rs): the run stops between steps or rollout
//! rounds and `train` raises KeyboardInterrupt.

mod ctrl_c;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use gpg::commands::{
    eval as eval_cmd, generate as generate_cmd, logprobs as logprobs_cmd, train as train_cmd,
};
use gpg::reward::in_process::{self, Registration};
use gpg::reward::{Reward, RewardInput, RewardSpec};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use pyo3::IntoPyObjectExt;

pyo3::create_exception!(
    _gpg_rl,
    GpgError,
    PyRuntimeError,
    "An error of the gpg-rl core (bad recipe, data, model, I/O), with the message the command \
     line would print."
);
pyo3::create_exception!(
    _gpg_rl,
    RewardFunctionError,
    GpgError,
    "A Python reward function raised, or returned something other than one finite float (or \
     None) per completion. The message names the function and the training step; the original \
     exception, if any, is the __cause__."
);

/// Why a run stopped in a Python reward function: the exception to raise (its own, or a
/// ValueError describing a malformed return value), or Ctrl-C.
enum Failure {
    Raised(PyErr),
    Interrupted,
}

/// The first failure of a run's Python reward functions (later ones cannot happen: the run
/// stops at the first).
type FailureSlot = Arc<Mutex<Option<Failure>>>;

/// A Python callable with TRL's reward signature, as a [`Reward`].
struct PyReward {
    name: String,
    func: Py<PyAny>,
    /// Keyword names under which the gold answers are passed (`answer`, and the recipe's
    /// `data.fields.answer_field` when it names another column). A dataset column of one of
    /// these names, or named `prompts`, `completions` or `completion_lengths`, is not passed
    /// (the keyword above holds the value).
    answer_keys: Vec<String>,
    failure: FailureSlot,
}

impl PyReward {
    fn fail(&self, failure: Failure) {
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(failure);
        }
    }

    /// Calls the function on the batch: `f(prompts=[...], completions=[...], answer=[...],
    /// completion_lengths=[...], **columns)`, where each of the dataset's other columns is a
    /// list with one value per completion (None where a record lacks it), as TRL passes them.
    fn call(&self, py: Python<'_>, batch: &[RewardInput]) -> PyResult<Py<PyAny>> {
        let kwargs = PyDict::new(py);
        let mut column_names: Vec<&str> = Vec::new();
        for input in batch {
            for name in input.columns.keys() {
                let reserved = ["prompts", "completions", "completion_lengths"]
                    .contains(&name.as_str())
                    || self.answer_keys.iter().any(|k| k == name);
                if !reserved && !column_names.contains(&name.as_str()) {
                    column_names.push(name);
                }
            }
        }
        for name in column_names {
            let values = PyList::empty(py);
            for input in batch {
                match input.columns.get(name) {
                    Some(value) => values.append(json_to_py(py, value)?)?,
                    None => values.append(py.None())?,
                }
            }
            kwargs.set_item(name, values)?;
        }
        kwargs.set_item(
            "prompts",
            PyList::new(py, batch.iter().map(|b| b.prompt.as_str()))?,
        )?;
        kwargs.set_item(
            "completions",
            PyList::new(py, batch.iter().map(|b| b.completion.as_str()))?,
        )?;
        let answers = PyList::new(py, batch.iter().map(|b| b.answer.as_deref()))?;
        for key in &self.answer_keys {
            kwargs.set_item(key, &answers)?;
        }
        kwargs.set_item(
            "completion_lengths",
            PyList::new(py, batch.iter().map(|b| b.completion_tokens))?,
        )?;
        self.func.call(py, (), Some(&kwargs))
    }

    /// One float per completion: None counts as 0 (TRL: the function does not apply to that
    /// completion); anything else must convert with float() and be finite.
    fn scores(&self, py: Python<'_>, value: Py<PyAny>, n: usize) -> Result<Vec<f32>, String> {
        let value = value.bind(py);
        if value.is_none() {
            return Ok(vec![0.0; n]);
        }
        let type_name = |v: &Bound<'_, PyAny>| {
            v.get_type()
                .name()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let items: Vec<Bound<'_, PyAny>> = match value.try_iter() {
            Ok(iter) => iter.collect::<PyResult<_>>().map_err(|e| e.to_string())?,
            Err(_) => {
                return Err(format!(
                    "returned a {} where a list of {n} floats (one per completion) was expected",
                    type_name(value)
                ))
            }
        };
        if items.len() != n {
            return Err(format!(
                "returned {} scores for a batch of {n} completions (one float or None per completion is expected)",
                items.len()
            ));
        }
        let mut scores = Vec::with_capacity(n);
        for (i, item) in items.iter().enumerate() {
            if item.is_none() {
                scores.push(0.0);
                continue;
            }
            let x: f64 = item.extract().map_err(|_| {
                format!(
                    "returned a {} for completion {i}; expected a float or None",
                    type_name(item)
                )
            })?;
            if !x.is_finite() {
                return Err(format!(
                    "returned {x} for completion {i}; rewards must be finite (None marks a completion the function does not score)"
                ));
            }
            scores.push(x as f32);
        }
        Ok(scores)
    }
}

impl Reward for PyReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, batch: &[RewardInput]) -> anyhow::Result<Vec<f32>> {
        Python::attach(|py| {
            // A pending Ctrl-C that Python's own handler caught (where `ctrl_c` installs none)
            // is seen here.
            if py.check_signals().is_err() {
                self.fail(Failure::Interrupted);
                anyhow::bail!("interrupted (KeyboardInterrupt)");
            }
            let value = match self.call(py, batch) {
                Ok(value) => value,
                Err(e) => {
                    let message = describe(py, &e);
                    if e.is_instance_of::<PyKeyboardInterrupt>(py) {
                        self.fail(Failure::Interrupted);
                        anyhow::bail!("interrupted (KeyboardInterrupt)");
                    }
                    self.fail(Failure::Raised(e));
                    anyhow::bail!("raised {message}");
                }
            };
            match self.scores(py, value, batch.len()) {
                Ok(scores) => Ok(scores),
                Err(why) => {
                    self.fail(Failure::Raised(PyValueError::new_err(why.clone())));
                    anyhow::bail!("{why}")
                }
            }
        })
    }
}

/// A JSON value as the Python object `json.loads` would make of it.
fn json_to_py<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    use serde_json::Value;
    match value {
        Value::Null => Ok(py.None().into_bound(py)),
        Value::Bool(b) => b.into_bound_py_any(py),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_bound_py_any(py),
            (None, Some(u)) => u.into_bound_py_any(py),
            _ => n.as_f64().unwrap_or(f64::NAN).into_bound_py_any(py),
        },
        Value::String(text) => text.as_str().into_bound_py_any(py),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(json_to_py(py, item)?)?;
            }
            Ok(list.into_any())
        }
        Value::Object(fields) => {
            let dict = PyDict::new(py);
            for (key, item) in fields {
                dict.set_item(key, json_to_py(py, item)?)?;
            }
            Ok(dict.into_any())
        }
    }
}

/// `TypeName: message` of a Python exception.
fn describe(py: Python<'_>, e: &PyErr) -> String {
    let name = e
        .get_type(py)
        .name()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "Exception".into());
    let value = e.value(py).str().map(|s| s.to_string()).unwrap_or_default();
    if value.is_empty() {
        name
    } else {
        format!("{name}: {value}")
    }
}

fn gpg_error(e: anyhow::Error) -> PyErr {
    GpgError::new_err(format!("{e:#}"))
}

/// One entry of `reward_funcs`: a built-in reward's name, or a Python callable with its name.
#[derive(FromPyObject)]
enum RewardEntry {
    Builtin(String),
    Function(Py<PyAny>),
}

/// The name of a Python function for logs and metrics (`__name__`, else the type's name),
/// made unique among the run's functions by a `_2`, `_3`… suffix.
fn function_name(py: Python<'_>, func: &Py<PyAny>, taken: &[String]) -> String {
    let f = func.bind(py);
    let base = f
        .getattr("__name__")
        .and_then(|n| n.extract::<String>())
        .or_else(|_| f.get_type().name().map(|s| s.to_string()))
        .unwrap_or_else(|_| "reward".into());
    let mut name = base.clone();
    let mut k = 2;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    name
}

/// Runs training (see `gpg_rl.train`); returns the run's summary as JSON text.
#[pyfunction]
#[pyo3(signature = (recipe_path, recipe_json, overrides, model_overridden, reward_funcs, reward_weights, resume, quiet))]
#[allow(clippy::too_many_arguments)]
fn train(
    py: Python<'_>,
    recipe_path: Option<PathBuf>,
    recipe_json: Option<String>,
    overrides: Vec<String>,
    model_overridden: bool,
    reward_funcs: Option<Vec<RewardEntry>>,
    reward_weights: Option<Vec<f32>>,
    resume: bool,
    quiet: bool,
) -> PyResult<String> {
    let recipe = match (recipe_path, recipe_json) {
        (Some(path), None) => train_cmd::Recipe::File(path),
        (None, Some(json)) => {
            let config: gpg::train::TrainConfig = serde_json::from_str(&json)
                .map_err(|e| GpgError::new_err(format!("the recipe dict: {e}")))?;
            train_cmd::Recipe::Config(Box::new(config))
        }
        (None, None) => train_cmd::Recipe::Demo,
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "give the recipe as a path or a dict, not both",
            ))
        }
    };
    let mut config = py
        .detach(|| train_cmd::prepare_config(&recipe, &overrides, model_overridden))
        .map_err(gpg_error)?;
    if quiet {
        config.logging.progress = false;
    }
    let failure: FailureSlot = Arc::new(Mutex::new(None));
    let mut registrations: Vec<Registration> = Vec::new();
    if let Some(entries) = reward_funcs {
        if entries.is_empty() {
            return Err(PyValueError::new_err(
                "reward_funcs is empty; give at least one function (or leave it out to use the recipe's rewards)",
            ));
        }
        let weights = match reward_weights {
            Some(w) if w.len() != entries.len() => {
                return Err(PyValueError::new_err(format!(
                    "reward_weights has {} weights for {} reward functions",
                    w.len(),
                    entries.len()
                )))
            }
            Some(w) => w,
            None => vec![1.0; entries.len()],
        };
        let mut answer_keys = vec!["answer".to_string()];
        if let Some(field) = &config.data.fields.answer_field {
            if field != "answer" {
                answer_keys.push(field.clone());
            }
        }
        let mut names: Vec<String> = Vec::new();
        let mut specs = Vec::with_capacity(entries.len());
        for (entry, weight) in entries.into_iter().zip(weights) {
            let spec = match entry {
                RewardEntry::Builtin(name) => RewardSpec {
                    name,
                    weight,
                    options: None,
                },
                RewardEntry::Function(func) => {
                    if !func.bind(py).is_callable() {
                        return Err(PyValueError::new_err(
                            "reward_funcs: each entry must be a callable or a built-in reward's name",
                        ));
                    }
                    let name = function_name(py, &func, &names);
                    names.push(name.clone());
                    let reward = PyReward {
                        name: name.clone(),
                        func,
                        answer_keys: answer_keys.clone(),
                        failure: failure.clone(),
                    };
                    registrations
                        .push(in_process::register(&name, Arc::new(reward)).map_err(gpg_error)?);
                    RewardSpec {
                        name: "in_process".into(),
                        weight,
                        options: Some(serde_json::json!({ "key": name })),
                    }
                }
            };
            specs.push(spec);
        }
        config.reward.functions = specs;
    }
    let demo = recipe.is_demo();
    // Ctrl-C from here on sets `stop` (the trainer polls it between steps and rollout rounds)
    // instead of waiting for Python to run its handler, which it cannot while the GIL is
    // released; Python's handler is back once the guard is dropped.
    let ctrl_c = ctrl_c::Guard::install()
        .map_err(|e| GpgError::new_err(format!("cannot install the Ctrl-C handler: {e}")))?;
    let stop = ctrl_c.flag();
    let result = py.detach(|| {
        train_cmd::run(
            config,
            demo,
            resume,
            Arc::new(gpg::train::collective::SingleProcess),
            Some(stop.clone()),
        )
    });
    let interrupted = stop.load(Ordering::SeqCst);
    drop(ctrl_c);
    drop(registrations);
    let summary = match result {
        Ok(summary) if interrupted => {
            return Err(PyKeyboardInterrupt::new_err(format!(
                "Ctrl-C came as the run ended: all {} steps were done and the model written to {}",
                summary.step,
                summary.final_dir.display()
            )))
        }
        Ok(summary) => summary,
        Err(e) => {
            let step = e.downcast_ref::<train_cmd::DuringStep>().map(|s| s.0);
            let mut taken = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
            if e.chain().any(|c| c.is::<gpg::train::trainer::Stopped>()) {
                taken = Some(Failure::Interrupted);
            }
            return Err(match taken {
                Some(Failure::Interrupted) => PyKeyboardInterrupt::new_err(format!(
                    "training stopped{} by Ctrl-C; the checkpoints written before it are intact (resume=True continues from the newest)",
                    step.map(|s| format!(" in step {s}")).unwrap_or_default()
                )),
                Some(Failure::Raised(cause)) => {
                    let err = RewardFunctionError::new_err(format!("{e:#}"));
                    err.set_cause(py, Some(cause));
                    err
                }
                None => gpg_error(e),
            });
        }
    };
    let json = serde_json::json!({
        "output_dir": summary.output_dir,
        "final_dir": summary.final_dir,
        "start_step": summary.start_step,
        "step": summary.step,
        "step_seconds": summary.step_seconds,
        "pass_at_1_before": summary.pass_at_1_before,
        "pass_at_1_after": summary.pass_at_1_after,
        "summary": train_cmd::summary_lines(&summary),
    });
    Ok(json.to_string())
}

fn parse_device(device: &str) -> PyResult<gpg::model::DeviceName> {
    device
        .parse()
        .map_err(|e: anyhow::Error| PyValueError::new_err(format!("device: {e}")))
}

/// `chat_template_kwargs` as JSON text (the Python wrapper serialises the dict).
fn parse_kwargs(
    kwargs: Option<String>,
) -> PyResult<Option<serde_json::Map<String, serde_json::Value>>> {
    kwargs
        .map(|text| gpg::tokenizer::parse_chat_template_kwargs(&text))
        .transpose()
        .map_err(|e| PyValueError::new_err(format!("chat_template_kwargs: {e:#}")))
}

fn parse_precision(precision: &str) -> PyResult<gpg::model::Precision> {
    precision
        .parse()
        .map_err(|e: anyhow::Error| PyValueError::new_err(format!("precision: {e}")))
}

/// Samples completions (see `gpg_rl.generate`); returns JSON lines as `gpg-rl generate
/// --format json` prints them.
#[pyfunction]
#[pyo3(signature = (model, prompts, chat, system, images, max_new_tokens, temperature, top_p, top_k, seed, n, ignore_eos, stop, device, precision, adapter, chat_template_kwargs))]
#[allow(clippy::too_many_arguments)]
fn generate(
    py: Python<'_>,
    model: PathBuf,
    prompts: Vec<String>,
    chat: bool,
    system: Option<String>,
    images: Vec<PathBuf>,
    max_new_tokens: usize,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: u64,
    n: usize,
    ignore_eos: bool,
    stop: Vec<String>,
    device: &str,
    precision: &str,
    adapter: Option<PathBuf>,
    chat_template_kwargs: Option<String>,
) -> PyResult<Vec<String>> {
    let options = generate_cmd::GenerateOptions {
        model,
        prompts,
        chat,
        system,
        chat_template_kwargs: parse_kwargs(chat_template_kwargs)?,
        images,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        n,
        ignore_eos,
        stop,
        device: parse_device(device)?,
        precision: parse_precision(precision)?,
        adapter,
    };
    let generated = py
        .detach(|| generate_cmd::generate(&options))
        .map_err(gpg_error)?;
    Ok(generated
        .completions
        .iter()
        .map(|c| {
            serde_json::json!({
                "prompt_index": c.prompt_index,
                "sample_index": c.sample_index,
                "prompt": options.prompts[c.prompt_index],
                "prompt_ids": generated.prompt_ids[c.prompt_index],
                "token_ids": c.token_ids,
                "text": c.text,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            })
            .to_string()
        })
        .collect())
}

/// Log-probs of completion tokens (see `gpg_rl.logprobs`): `records` as JSON objects, or a
/// JSONL file; returns the records with `completion_ids` and `logprobs`, as JSON text.
#[pyfunction]
#[pyo3(signature = (model, records, path, batch_tokens, device, precision, adapter, chat_template_kwargs))]
#[allow(clippy::too_many_arguments)]
fn logprobs(
    py: Python<'_>,
    model: PathBuf,
    records: Option<Vec<String>>,
    path: Option<PathBuf>,
    batch_tokens: usize,
    device: &str,
    precision: &str,
    adapter: Option<PathBuf>,
    chat_template_kwargs: Option<String>,
) -> PyResult<Vec<String>> {
    let options = logprobs_cmd::LogprobsOptions {
        model,
        batch_tokens,
        device: parse_device(device)?,
        precision: parse_precision(precision)?,
        adapter,
        chat_template_kwargs: parse_kwargs(chat_template_kwargs)?,
    };
    let scored = py
        .detach(|| -> anyhow::Result<_> {
            let (records, base) = match (records, path) {
                (Some(records), None) => {
                    let parsed = records
                        .iter()
                        .enumerate()
                        .map(|(i, text)| {
                            let where_ = format!("records[{i}]");
                            let record = serde_json::from_str(text)
                                .with_context(|| format!("{where_}: not a JSON object"))?;
                            Ok((where_, record))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    (parsed, std::env::current_dir().unwrap_or_default())
                }
                (None, Some(path)) => {
                    let base = path
                        .parent()
                        .map(std::path::Path::to_path_buf)
                        .unwrap_or_default();
                    (logprobs_cmd::read_jsonl(&path)?, base)
                }
                _ => anyhow::bail!("give the records or a JSONL path, one of them"),
            };
            logprobs_cmd::logprobs(&options, records, &base)
        })
        .map_err(gpg_error)?;
    Ok(scored
        .into_iter()
        .map(|r| serde_json::Value::Object(r).to_string())
        .collect())
}

/// Evaluates a model on a benchmark (see `gpg_rl.eval`); returns the summary as JSON text (what
/// `gpg-rl eval --json` prints).
#[pyfunction]
#[pyo3(signature = (model, benchmark, samples, temperature, top_p, top_k, max_new_tokens, seed, limit, batch_prompts, output, write_output, chat, system, no_system, stop, device, precision, adapter, quiet, chat_template_kwargs))]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    model: PathBuf,
    benchmark: String,
    samples: usize,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    max_new_tokens: usize,
    seed: u64,
    limit: Option<usize>,
    batch_prompts: usize,
    output: Option<PathBuf>,
    write_output: bool,
    chat: bool,
    system: Option<String>,
    no_system: bool,
    stop: Vec<String>,
    device: &str,
    precision: &str,
    adapter: Option<PathBuf>,
    quiet: bool,
    chat_template_kwargs: Option<String>,
) -> PyResult<String> {
    let options = eval_cmd::EvalOptions {
        model,
        benchmark,
        sampling: gpg::eval::EvalConfig {
            samples,
            temperature,
            top_p,
            top_k,
            max_new_tokens,
            seed,
            stop_token_ids: Vec::new(),
            stop_strings: stop,
            batch_prompts,
        },
        limit,
        results: match (output, write_output) {
            (_, false) => eval_cmd::ResultsFile::None,
            (Some(path), true) => eval_cmd::ResultsFile::Path(path),
            (None, true) => eval_cmd::ResultsFile::Default,
        },
        no_chat: !chat,
        system,
        no_system,
        chat_template_kwargs: parse_kwargs(chat_template_kwargs)?,
        device: parse_device(device)?,
        precision: parse_precision(precision)?,
        adapter,
        quiet,
    };
    let outcome = py
        .detach(|| eval_cmd::evaluate(&options))
        .map_err(gpg_error)?;
    Ok(eval_cmd::summary_json(&options, &outcome).to_string())
}

/// The built-in demo recipe (recipes/demo.toml) as TOML text.
#[pyfunction]
fn demo_recipe() -> &'static str {
    gpg::commands::demo::DEMO_RECIPE
}

#[pymodule]
fn _gpg_rl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GpgError", m.py().get_type::<GpgError>())?;
    m.add(
        "RewardFunctionError",
        m.py().get_type::<RewardFunctionError>(),
    )?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(generate, m)?)?;
    m.add_function(wrap_pyfunction!(logprobs, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(demo_recipe, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
