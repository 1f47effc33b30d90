//! Reading prompt records from a Parquet file (row API).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::{Map, Number, Value};

use super::fields::{record_from_fields, PromptDatasetConfig};
use super::record::{Location, PromptRecord};

/// Reads every row of the Parquet file at `path` into a record. The prompt, answer and id
/// columns must convert to JSON (errors name the row and the column); the other columns are
/// kept in [`PromptRecord::columns`] when they do, and left out when they do not (decimals,
/// dates, binary that is not UTF-8). Rows are numbered from 1 in error messages (`file row N`).
pub fn read_parquet(
    path: &Path,
    config: &PromptDatasetConfig,
) -> anyhow::Result<Vec<PromptRecord>> {
    let name = path.display().to_string();
    let file = File::open(path).with_context(|| format!("cannot open {name}"))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{name}: not a readable Parquet file"))?;
    let schema = reader.metadata().file_metadata().schema();
    let columns: Vec<Arc<Type>> = schema.get_fields().to_vec();
    let has = |c: &str| columns.iter().any(|t| t.name() == c);

    let prompt_candidates = config.prompt_candidates();
    let prompt_column = prompt_candidates.iter().copied().find(|c| has(c)).ok_or_else(|| {
        anyhow::anyhow!(
            "{name}: no prompt column (looked for {}; columns are {}; set prompt_field to choose one)",
            prompt_candidates.join(", "),
            columns.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let mut wanted = vec![prompt_column];
    if let Some(answer_column) = config.answer_candidates().into_iter().find(|c| has(c)) {
        wanted.push(answer_column);
    }
    if has(config.id_name()) && !wanted.contains(&config.id_name()) {
        wanted.push(config.id_name());
    }
    let projection = Type::group_type_builder(schema.name())
        .with_fields(
            columns
                .iter()
                .filter(|t| wanted.contains(&t.name()))
                .cloned()
                .collect(),
        )
        .build()
        .with_context(|| format!("{name}: building the column projection"))?;

    // Every column when the row reader takes them all, else only the needed ones.
    let rows = match reader.get_row_iter(None) {
        Ok(rows) => rows,
        Err(_) => reader
            .get_row_iter(Some(projection))
            .with_context(|| format!("{name}: reading rows"))?,
    };
    let mut records = Vec::new();
    for (i, row) in rows.enumerate() {
        let location = Location::new(name.clone(), "row", i + 1);
        let row = row.with_context(|| format!("{location}: cannot decode the row"))?;
        let mut fields = Map::new();
        for (column, field) in row.get_column_iter() {
            match field_to_json(field) {
                Ok(value) => {
                    fields.insert(column.clone(), value);
                }
                Err(e) if wanted.contains(&column.as_str()) => {
                    return Err(e.context(format!("{location}: field `{column}`")));
                }
                // Another column of a type JSON does not hold: not kept.
                Err(_) => {}
            }
        }
        records.push(record_from_fields(&fields, location, config)?);
    }
    Ok(records)
}

/// The JSON value of a Parquet field: strings, numbers, booleans, null, lists and structs.
/// Other logical types (decimals, dates, binary that is not UTF-8) are errors.
fn field_to_json(field: &Field) -> anyhow::Result<Value> {
    let number = |x: f64| {
        Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| anyhow::anyhow!("non-finite number {x}"))
    };
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float16(x) => number(f64::from(x.to_f32()))?,
        Field::Float(x) => number(f64::from(*x))?,
        Field::Double(x) => number(*x)?,
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(bytes) => Value::String(
            std::str::from_utf8(bytes.data())
                .map_err(|_| anyhow::anyhow!("binary value is not UTF-8 text"))?
                .to_string(),
        ),
        Field::Group(row) => {
            let mut map = Map::new();
            for (key, value) in row.get_column_iter() {
                map.insert(key.clone(), field_to_json(value)?);
            }
            Value::Object(map)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(field_to_json)
                .collect::<anyhow::Result<_>>()?,
        ),
        Field::MapInternal(map) => {
            let mut object = Map::new();
            for (key, value) in map.entries() {
                let Field::Str(key) = key else {
                    anyhow::bail!("map key {key} is not a string");
                };
                object.insert(key.clone(), field_to_json(value)?);
            }
            Value::Object(object)
        }
        other => {
            anyhow::bail!("unsupported Parquet value {other} (expected text, a number or a list)")
        }
    })
}
