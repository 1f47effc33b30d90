//! A prompt dataset loaded from a JSONL or Parquet file, and the prompt-length limit.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fields::{record_from_fields, type_name, PromptDatasetConfig};
use super::parquet_rows::read_parquet;
use super::record::{Location, Prompt, PromptRecord};

/// The prompts of one dataset file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptDataset {
    /// The file the records came from (for messages).
    pub source: String,
    pub records: Vec<PromptRecord>,
}

/// What to do with a prompt longer than the maximum prompt length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongPromptPolicy {
    /// Remove it from the dataset (the count is returned).
    #[default]
    Drop,
    /// Fail, naming its file and line.
    Error,
}

impl PromptDataset {
    /// Loads `path` by its extension: `.jsonl` / `.json` (one JSON object per line) or
    /// `.parquet`.
    pub fn load(path: impl AsRef<Path>, config: &PromptDatasetConfig) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("jsonl") | Some("json") | Some("ndjson") => Self::load_jsonl(path, config),
            Some("parquet") => Self::load_parquet(path, config),
            _ => anyhow::bail!(
                "{}: unknown dataset format (expected a .jsonl or .parquet file)",
                path.display()
            ),
        }
    }

    /// Loads a JSON-lines file: one object per line; blank lines are skipped.
    pub fn load_jsonl(
        path: impl AsRef<Path>,
        config: &PromptDatasetConfig,
    ) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("cannot open {name}"))?;
        Self::from_jsonl_reader(BufReader::new(file), &name, config)
    }

    /// Reads JSON lines from `reader`; `source` names it in messages.
    pub fn from_jsonl_reader(
        reader: impl BufRead,
        source: &str,
        config: &PromptDatasetConfig,
    ) -> anyhow::Result<Self> {
        let mut records = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let location = Location::new(source, "line", i + 1);
            let line = line.with_context(|| format!("{location}: cannot read the line"))?;
            // Tolerate a UTF-8 byte-order mark at the start of the file.
            let line = if i == 0 {
                line.strip_prefix('\u{feff}').unwrap_or(&line)
            } else {
                &line
            };
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("{location}: malformed JSON: {e}"))?;
            let Value::Object(fields) = value else {
                anyhow::bail!(
                    "{location}: expected a JSON object, got {}",
                    type_name(&value)
                );
            };
            records.push(record_from_fields(&fields, location, config)?);
        }
        Self::new(source, records)
    }

    /// Loads a Parquet file (string, number and list-of-struct columns; snappy, gzip and
    /// zstd compression).
    pub fn load_parquet(
        path: impl AsRef<Path>,
        config: &PromptDatasetConfig,
    ) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let records = read_parquet(path, config)?;
        Self::new(path.display().to_string(), records)
    }

    /// A dataset of `records`; errors if there are none.
    pub fn new(source: impl Into<String>, records: Vec<PromptRecord>) -> anyhow::Result<Self> {
        let source = source.into();
        anyhow::ensure!(!records.is_empty(), "{source}: the dataset has no records");
        Ok(Self { source, records })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records at `indices` (e.g. a sampler's batch), in that order.
    pub fn batch(&self, indices: &[usize]) -> anyhow::Result<Vec<&PromptRecord>> {
        indices
            .iter()
            .map(|&i| {
                self.records.get(i).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{}: index {i} out of range ({} records)",
                        self.source,
                        self.len()
                    )
                })
            })
            .collect()
    }

    /// Applies a maximum prompt length measured by `measure` (e.g. render with the chat
    /// template and count tokens). Returns how many prompts were dropped (always 0 with
    /// [`LongPromptPolicy::Error`], which instead fails naming the first long prompt's
    /// file and line). Fails if every prompt would be dropped or `measure` fails.
    pub fn limit_prompt_length_with(
        &mut self,
        max_tokens: usize,
        policy: LongPromptPolicy,
        measure: &dyn Fn(&Prompt) -> anyhow::Result<usize>,
    ) -> anyhow::Result<usize> {
        let mut keep = Vec::with_capacity(self.records.len());
        for record in &self.records {
            let tokens = measure(&record.prompt)
                .with_context(|| format!("{}: measuring the prompt", record.location))?;
            if tokens > max_tokens && policy == LongPromptPolicy::Error {
                anyhow::bail!(
                    "{}: prompt has {tokens} tokens, more than the maximum prompt length {max_tokens}",
                    record.location
                );
            }
            keep.push(tokens <= max_tokens);
        }
        let before = self.records.len();
        let kept = keep.iter().filter(|&&k| k).count();
        anyhow::ensure!(
            kept > 0,
            "{}: all {before} prompts are longer than the maximum prompt length {max_tokens} tokens",
            self.source
        );
        let mut keep = keep.into_iter();
        self.records.retain(|_| keep.next().unwrap_or(false));
        Ok(before - kept)
    }

    /// [`Self::limit_prompt_length_with`] with a token counter over text: each prompt is
    /// measured as its [`Prompt::plain_text`] (for chat prompts this leaves out the
    /// template's own tokens; use `limit_prompt_length_with` and the rendered text to
    /// count them too).
    pub fn limit_prompt_length(
        &mut self,
        max_tokens: usize,
        policy: LongPromptPolicy,
        count_tokens: &dyn Fn(&str) -> anyhow::Result<usize>,
    ) -> anyhow::Result<usize> {
        self.limit_prompt_length_with(max_tokens, policy, &|p: &Prompt| {
            count_tokens(&p.plain_text())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;
    use crate::data::record::ChatMessage;

    fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        path
    }

    fn raw_config() -> PromptDatasetConfig {
        PromptDatasetConfig {
            apply_chat_template: false,
            ..Default::default()
        }
    }

    #[test]
    fn jsonl_records_in_order_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            &dir,
            "train.jsonl",
            "{\"problem\": \"1+1?\", \"answer\": \"2\"}\n\n{\"problem\": \"2+2?\", \"answer\": 4, \"id\": \"q2\"}\n",
        );
        let d = PromptDataset::load(&path, &raw_config()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.records[0].prompt, Prompt::Text("1+1?".into()));
        assert_eq!(d.records[0].id, "1");
        assert_eq!(d.records[1].id, "q2");
        assert_eq!(d.records[1].answer.as_deref(), Some("4"));
        assert_eq!(
            d.records[1].location.to_string(),
            format!("{} line 3", path.display())
        );
        let bom_crlf = "\u{feff}{\"problem\": \"a\"}\r\n{\"problem\": \"b\"}\r\n";
        let d2 = PromptDataset::from_jsonl_reader(bom_crlf.as_bytes(), "w.jsonl", &raw_config())
            .unwrap();
        assert_eq!(d2.records[1].prompt, Prompt::Text("b".into()));
        let batch = d.batch(&[1, 0]).unwrap();
        assert_eq!(batch[0].id, "q2");
        assert!(d.batch(&[2]).is_err());
    }

    #[test]
    fn jsonl_records_keep_their_other_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(
            &dir,
            "cols.jsonl",
            "{\"question\": \"1+1?\", \"solution\": 2, \"difficulty\": 0.5, \"tags\": [\"a\"], \"meta\": {\"src\": \"x\"}}\n\
             {\"question\": \"2+2?\", \"solution\": \"4\"}\n",
        );
        let d = PromptDataset::load(&path, &raw_config()).unwrap();
        let first = &d.records[0].columns;
        // The prompt field is the prompt; the rest is kept by name, JSON values as read.
        assert!(!first.contains_key("question"));
        assert_eq!(first["solution"], serde_json::json!(2));
        assert_eq!(first["difficulty"], serde_json::json!(0.5));
        assert_eq!(first["tags"], serde_json::json!(["a"]));
        assert_eq!(first["meta"], serde_json::json!({"src": "x"}));
        assert_eq!(d.records[0].answer.as_deref(), Some("2"));
        let second: Vec<&String> = d.records[1].columns.keys().collect();
        assert_eq!(second, vec!["solution"]);
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "{\"problem\": \"a\"}\n{\"problem\": \"b\"\n",
                "line 2",
                "malformed JSON",
            ),
            (
                "{\"problem\": \"a\"}\n[1, 2]\n",
                "line 2",
                "expected a JSON object",
            ),
            (
                "{\"problem\": \"a\"}\n\n{\"question\": 5}\n",
                "line 3",
                "`question`",
            ),
            ("{\"q\": \"a\"}\n", "line 1", "missing prompt field"),
            ("\n  \n", "bad.jsonl", "no records"),
        ];
        for (text, where_, what) in cases {
            let path = write_file(&dir, "bad.jsonl", text);
            let err = PromptDataset::load(&path, &raw_config())
                .unwrap_err()
                .to_string();
            assert!(err.contains("bad.jsonl"), "{err}");
            assert!(
                err.contains(where_) && err.contains(what),
                "{text:?}: {err}"
            );
        }
        let err = PromptDataset::load(dir.path().join("missing.jsonl"), &raw_config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.jsonl"), "{err}");
        let err = PromptDataset::load(dir.path().join("data.csv"), &raw_config())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data.csv") && err.contains("unknown dataset format"),
            "{err}"
        );
    }

    /// One leaf column of a test Parquet file: values, definition and repetition levels.
    enum Leaf {
        Text(Vec<&'static str>, Option<Vec<i16>>, Option<Vec<i16>>),
        Long(Vec<i64>),
        Int(Vec<i32>),
    }

    fn write_parquet(path: &Path, schema: &str, leaves: Vec<Leaf>, compression: Compression) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(compression)
                .build(),
        );
        let file = File::create(path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        for leaf in leaves {
            let mut column = group.next_column().unwrap().unwrap();
            match leaf {
                Leaf::Text(values, defs, reps) => {
                    let values: Vec<ByteArray> = values.into_iter().map(ByteArray::from).collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, defs.as_deref(), reps.as_deref())
                        .unwrap();
                }
                Leaf::Long(values) => {
                    column
                        .typed::<Int64Type>()
                        .write_batch(&values, None, None)
                        .unwrap();
                }
                Leaf::Int(values) => {
                    column
                        .typed::<Int32Type>()
                        .write_batch(&values, None, None)
                        .unwrap();
                }
            }
            column.close().unwrap();
        }
        assert!(group.next_column().unwrap().is_none());
        group.close().unwrap();
        writer.close().unwrap();
    }

    const FLAT_SCHEMA: &str = "message schema {
        REQUIRED BYTE_ARRAY problem (UTF8);
        OPTIONAL BYTE_ARRAY answer (UTF8);
        REQUIRED INT64 id;
        REQUIRED BYTE_ARRAY notes (UTF8);
    }";

    fn flat_leaves() -> Vec<Leaf> {
        vec![
            Leaf::Text(vec!["1+1?", "2*3?", "7-2?"], None, None),
            Leaf::Text(vec!["2", "5"], Some(vec![1, 0, 1]), None),
            Leaf::Long(vec![10, 11, 12]),
            Leaf::Text(vec!["x", "y", "z"], None, None),
        ]
    }

    #[test]
    fn parquet_flat_columns_with_common_compressions() {
        let dir = tempfile::tempdir().unwrap();
        let compressions = [
            Compression::UNCOMPRESSED,
            Compression::SNAPPY,
            Compression::GZIP(GzipLevel::default()),
            Compression::ZSTD(ZstdLevel::default()),
        ];
        let config = PromptDatasetConfig {
            system_prompt: Some("Be brief.".into()),
            ..Default::default()
        };
        for (k, compression) in compressions.into_iter().enumerate() {
            let path = dir.path().join(format!("train{k}.parquet"));
            write_parquet(&path, FLAT_SCHEMA, flat_leaves(), compression);
            let d = PromptDataset::load(&path, &config).unwrap();
            let ids: Vec<&str> = d.records.iter().map(|r| r.id.as_str()).collect();
            let answers: Vec<Option<&str>> =
                d.records.iter().map(|r| r.answer.as_deref()).collect();
            assert_eq!(ids, vec!["10", "11", "12"], "{compression:?}");
            assert_eq!(answers, vec![Some("2"), None, Some("5")], "{compression:?}");
            // Every column but the prompt's is kept as read (a null where the row has none).
            let columns = |v: serde_json::Value| v.as_object().unwrap().clone();
            assert_eq!(
                d.records[0].columns,
                columns(serde_json::json!({"answer": "2", "id": 10, "notes": "x"}))
            );
            assert_eq!(
                d.records[1].columns,
                columns(serde_json::json!({"answer": null, "id": 11, "notes": "y"}))
            );
            assert_eq!(
                d.records[1].prompt,
                Prompt::Chat(vec![
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "2*3?"),
                ])
            );
            assert_eq!(
                d.records[2].location.to_string(),
                format!("{} row 3", path.display())
            );
        }
    }

    #[test]
    fn parquet_chat_messages_and_integer_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.parquet");
        let schema = "message schema {
            REQUIRED group messages (LIST) {
                REPEATED group list {
                    REQUIRED group element {
                        REQUIRED BYTE_ARRAY role (UTF8);
                        REQUIRED BYTE_ARRAY content (UTF8);
                    }
                }
            }
            REQUIRED INT32 answer;
        }";
        let defs = Some(vec![1, 1, 1, 1]);
        let reps = Some(vec![0, 0, 1, 1]);
        write_parquet(
            &path,
            schema,
            vec![
                Leaf::Text(
                    vec!["user", "system", "user", "assistant"],
                    defs.clone(),
                    reps.clone(),
                ),
                Leaf::Text(vec!["a", "s", "b", "x"], defs, reps),
                Leaf::Int(vec![3, 4]),
            ],
            Compression::SNAPPY,
        );
        let d = PromptDataset::load(&path, &PromptDatasetConfig::default()).unwrap();
        assert_eq!(
            d.records[0].prompt,
            Prompt::Chat(vec![ChatMessage::new("user", "a")])
        );
        assert_eq!(
            d.records[1].prompt,
            Prompt::Chat(vec![
                ChatMessage::new("system", "s"),
                ChatMessage::new("user", "b")
            ])
        );
        assert_eq!(d.records[1].answer.as_deref(), Some("4"));
        assert_eq!(d.records[1].id, "2");
    }

    #[test]
    fn parquet_errors_name_file_row_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typed.parquet");
        write_parquet(
            &path,
            "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED BYTE_ARRAY answer (UTF8); }",
            vec![
                Leaf::Text(vec!["ok", ""], None, None),
                Leaf::Text(vec!["1", "2"], None, None),
            ],
            Compression::SNAPPY,
        );
        let err = PromptDataset::load(&path, &raw_config())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("typed.parquet row 2")
                && err.contains("`question`")
                && err.contains("empty"),
            "{err}"
        );

        let config = PromptDatasetConfig {
            prompt_field: Some("problem".into()),
            ..raw_config()
        };
        let err = PromptDataset::load(&path, &config).unwrap_err().to_string();
        assert!(
            err.contains("typed.parquet") && err.contains("problem") && err.contains("question"),
            "{err}"
        );

        let path = dir.path().join("numbers.parquet");
        write_parquet(
            &path,
            "message schema { REQUIRED INT64 problem; }",
            vec![Leaf::Long(vec![5])],
            Compression::SNAPPY,
        );
        let err = PromptDataset::load(&path, &raw_config())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 1") && err.contains("`problem`") && err.contains("number"),
            "{err}"
        );

        let path = write_file(&dir, "fake.parquet", "not parquet at all");
        let err = PromptDataset::load(&path, &raw_config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("fake.parquet"), "{err}");
    }

    fn dataset(prompts: &[&str]) -> PromptDataset {
        let text: String = prompts
            .iter()
            .map(|p| format!("{{\"problem\": \"{p}\"}}\n"))
            .collect();
        PromptDataset::from_jsonl_reader(text.as_bytes(), "mem.jsonl", &raw_config()).unwrap()
    }

    /// Counts whitespace-separated words.
    fn words(text: &str) -> anyhow::Result<usize> {
        Ok(text.split_whitespace().count())
    }

    #[test]
    fn long_prompts_are_dropped_and_counted() {
        let mut d = dataset(&["a b", "a b c d", "a", "a b c"]);
        let dropped = d
            .limit_prompt_length(3, LongPromptPolicy::Drop, &words)
            .unwrap();
        assert_eq!(dropped, 1);
        let kept: Vec<&str> = d.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(kept, vec!["1", "3", "4"]);
    }

    #[test]
    fn long_prompt_error_names_the_line_and_keeps_the_dataset() {
        let mut d = dataset(&["a b", "a b c d", "a"]);
        let err = d
            .limit_prompt_length(3, LongPromptPolicy::Error, &words)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mem.jsonl line 2") && err.contains("4 tokens"),
            "{err}"
        );
        assert_eq!(d.len(), 3);
        let err = d
            .limit_prompt_length(0, LongPromptPolicy::Drop, &words)
            .unwrap_err()
            .to_string();
        assert!(err.contains("all 3 prompts"), "{err}");
        assert_eq!(d.len(), 3);
        let failing = |_: &str| -> anyhow::Result<usize> { anyhow::bail!("no tokenizer") };
        let err = format!(
            "{:#}",
            d.limit_prompt_length(3, LongPromptPolicy::Drop, &failing)
                .unwrap_err()
        );
        assert!(
            err.contains("line 1") && err.contains("no tokenizer"),
            "{err}"
        );
    }

    #[test]
    fn chat_prompts_are_measured_by_the_given_renderer() {
        let text = "{\"problem\": \"a b\"}\n{\"problem\": \"a\"}\n";
        let config = PromptDatasetConfig {
            system_prompt: Some("s s".into()),
            ..Default::default()
        };
        let mut d =
            PromptDataset::from_jsonl_reader(text.as_bytes(), "chat.jsonl", &config).unwrap();
        // A renderer that adds one token per message, like a template's role markers.
        let rendered = |p: &Prompt| -> anyhow::Result<usize> {
            match p {
                Prompt::Chat(m) => Ok(m
                    .iter()
                    .map(|m| 1 + m.content.split_whitespace().count())
                    .sum()),
                Prompt::Text(t) => words(t),
            }
        };
        // "s s" + "a b" → 3 + 3 = 6 tokens; "s s" + "a" → 3 + 2 = 5.
        let dropped = d
            .limit_prompt_length_with(5, LongPromptPolicy::Drop, &rendered)
            .unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(d.records[0].id, "2");
    }
}
