//! Python's `json.dumps` over template values: the `tojson` filter that chat templates see.
//!
//! transformers replaces Jinja's own `tojson` (which HTML-escapes `<`, `>`, `&`, `'`) with
//! `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, so a
//! tool schema renders as `{"name": "f", "parameters": {}}` with a space after `:` and `,`.
//! This module reproduces that output byte for byte for the JSON-like values a template can
//! hold (none, bools, integers, floats, strings, lists, maps).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// Options of Python's `json.dumps` that transformers' `tojson` exposes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DumpOptions {
    /// Escape every non-ASCII character as `\uXXXX` (UTF-16 code units, lowercase hex).
    pub ensure_ascii: bool,
    /// `None`: everything on one line. `Some(s)`: one element per line, nested levels
    /// indented by repeating `s` (Python's `indent=n` is `s = " " * n`).
    pub indent: Option<String>,
    /// Between items and between a key and its value. Python's default is `(", ", ": ")`
    /// without indent and `(",", ": ")` with one.
    pub item_separator: String,
    pub key_separator: String,
    /// Sort map entries by key.
    pub sort_keys: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            ensure_ascii: false,
            indent: None,
            item_separator: ", ".to_string(),
            key_separator: ": ".to_string(),
            sort_keys: false,
        }
    }
}

impl DumpOptions {
    /// Reads `ensure_ascii`, `indent`, `separators` and `sort_keys` keyword arguments the way
    /// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
    /// sort_keys=False)` does; any other keyword is an error.
    pub(crate) fn from_kwargs(kwargs: &Kwargs) -> Result<DumpOptions, Error> {
        let mut options = DumpOptions::default();
        if let Some(ensure_ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
            options.ensure_ascii = ensure_ascii;
        }
        let indent: Option<Value> = kwargs.get("indent")?;
        if let Some(indent) = indent.filter(|v| !v.is_none() && !v.is_undefined()) {
            let unit = if let Some(s) = indent.as_str() {
                s.to_string()
            } else if let Some(n) = indent.as_i64() {
                " ".repeat(usize::try_from(n).unwrap_or(0))
            } else {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: indent must be an integer or a string, got {indent}"),
                ));
            };
            options.indent = Some(unit);
            options.item_separator = ",".to_string();
        }
        let separators: Option<Value> = kwargs.get("separators")?;
        if let Some(separators) = separators.filter(|v| !v.is_none() && !v.is_undefined()) {
            let parts: Vec<String> = separators
                .try_iter()?
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings (item, key)",
                    )
                })?;
            options.item_separator = parts[0].clone();
            options.key_separator = parts[1].clone();
        }
        if let Some(sort_keys) = kwargs.get::<Option<bool>>("sort_keys")? {
            options.sort_keys = sort_keys;
        }
        kwargs.assert_all_used()?;
        Ok(options)
    }
}

/// `json.dumps(value, **options)`.
pub(crate) fn dumps(value: &Value, options: &DumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, options, 0)?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    options: &DumpOptions,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value)?,
        ValueKind::String => write_string(out, value.as_str().unwrap_or_default(), options),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', &items, options, depth, |out, item, depth| {
                write_value(out, item, options, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((map_key(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                '{',
                '}',
                &entries,
                options,
                depth,
                |out, (key, item), depth| {
                    write_string(out, key, options);
                    out.push_str(&options.key_separator);
                    write_value(out, item, options, depth)
                },
            )?;
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of kind {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Writes `open item (sep item)* close`, one item per line when indenting. An empty
/// container is `[]` / `{}` even with indent, as in Python.
fn write_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: &[T],
    options: &DumpOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&options.item_separator);
        }
        if let Some(unit) = &options.indent {
            out.push('\n');
            out.push_str(&unit.repeat(depth + 1));
        }
        write_item(out, item, depth + 1)?;
    }
    if let Some(unit) = &options.indent {
        out.push('\n');
        out.push_str(&unit.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python turns non-string keys into strings: `1` → `"1"`, `True` → `"true"`, `None` → `"null"`.
fn map_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None | ValueKind::Undefined => Ok("null".to_string()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key)?;
            Ok(s)
        }
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

fn write_number(out: &mut String, value: &Value) -> Result<(), Error> {
    if value.is_integer() {
        out.push_str(&value.to_string());
        return Ok(());
    }
    let x = f64::try_from(value.clone())?;
    out.push_str(&python_float_repr(x));
    Ok(())
}

/// Python's `repr(float)` as `json.dumps` writes it: the shortest digits that round-trip, in
/// positional notation when the decimal exponent e satisfies −4 ≤ e < 16 (`0.0001`,
/// `1000000000000000.0`), otherwise scientific with a signed two-digit-minimum exponent
/// (`1e-05`, `1.5e+16`); non-finite values are `NaN`, `Infinity`, `-Infinity`.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{x:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat(point.unsigned_abs() as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.unsigned_abs())
    }
}

/// A JSON string literal as Python writes it: `"` and `\` escaped, `\n \r \t \b \f` by name,
/// other control characters as `\u00XX`; with `ensure_ascii` also everything outside
/// `' '..='~'` as `\uXXXX` (surrogate pairs above U+FFFF).
fn write_string(out: &mut String, s: &str, options: &DumpOptions) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if options.ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    fn dumps_default(v: &Value) -> String {
        dumps(v, &DumpOptions::default()).unwrap()
    }

    #[test]
    fn float_repr_matches_python() {
        // Reference values: CPython's repr().
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123456789.0, "123456789.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e100, "1e+100"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (std::f64::consts::PI, "3.141592653589793"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "repr({x:e})");
        }
    }

    #[test]
    fn dumps_matches_python_defaults() {
        // json.dumps({"name": "f", "args": [1, 2.5, True, None], "s": "é<\n\"\\"}, ensure_ascii=False)
        let args = Value::from(vec![
            Value::from(1),
            Value::from(2.5),
            Value::from(true),
            Value::from(()),
        ]);
        let v = Value::from_iter([
            ("name", Value::from("f")),
            ("args", args),
            ("s", Value::from("é<\n\"\\")),
        ]);
        assert_eq!(
            dumps_default(&v),
            "{\"name\": \"f\", \"args\": [1, 2.5, true, null], \"s\": \"é<\\n\\\"\\\\\"}"
        );
        assert_eq!(dumps_default(&Value::from(Vec::<i32>::new())), "[]");
        assert_eq!(dumps_default(&Value::from("\u{1}")), "\"\\u0001\"");
    }

    #[test]
    fn dumps_with_indent_sort_and_ascii() {
        // json.dumps({"b": [1, {}], "a": "😀é"}, indent=2, sort_keys=True, ensure_ascii=True)
        let v = Value::from_serialize(serde_json::json!({"b": [1, {}], "a": "😀é"}));
        let options = DumpOptions {
            ensure_ascii: true,
            indent: Some("  ".into()),
            item_separator: ",".into(),
            key_separator: ": ".into(),
            sort_keys: true,
        };
        assert_eq!(
            dumps(&v, &options).unwrap(),
            "{\n  \"a\": \"\\ud83d\\ude00\\u00e9\",\n  \"b\": [\n    1,\n    {}\n  ]\n}"
        );
    }

    #[test]
    fn kwargs_follow_transformers_signature() {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", |v: Value, kwargs: Kwargs| {
            let options = DumpOptions::from_kwargs(&kwargs)?;
            dumps(&v, &options)
        });
        let render =
            |src: &str| env.render_str(src, context! { x => serde_json::json!({"k": [1, 2]}) });
        assert_eq!(render("{{ x | tojson }}").unwrap(), "{\"k\": [1, 2]}");
        assert_eq!(
            render("{{ x | tojson(indent=1) }}").unwrap(),
            "{\n \"k\": [\n  1,\n  2\n ]\n}"
        );
        assert_eq!(
            render("{{ x | tojson(separators=(',', ':')) }}").unwrap(),
            "{\"k\":[1,2]}"
        );
        assert!(render("{{ x | tojson(colour=1) }}").is_err());
    }
}
