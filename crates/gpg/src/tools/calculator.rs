//! The built-in calculator: exact arithmetic on the expression it is given, with
//! mathverify's parser and exact evaluator (rationals of bounded size: integers, fractions,
//! decimals, + − × ÷, powers, parentheses). `{"expression": "(23+58)*4-17"}` → `307`;
//! `1/3 + 1/6` → `1/2`. An expression with symbols, an irrational value or a result beyond
//! the evaluator's size bound is an error, as is one longer than [`MAX_EXPRESSION_CHARS`].

use serde_json::{json, Map, Value};

use super::Tool;

/// Longest expression accepted (keeps a call's parse time bounded).
pub const MAX_EXPRESSION_CHARS: usize = 500;

/// The calculator tool.
#[derive(Debug, Clone, Default)]
pub struct Calculator;

impl Calculator {
    /// The exact value of `expression` as text: an integer, or a reduced fraction `p/q`.
    pub fn evaluate(expression: &str) -> Result<String, String> {
        let expression = expression.trim();
        if expression.is_empty() {
            return Err("empty expression".into());
        }
        if expression.chars().count() > MAX_EXPRESSION_CHARS {
            return Err(format!(
                "expression longer than {MAX_EXPRESSION_CHARS} characters"
            ));
        }
        // `×`, `÷` and `**` as people and Python write them.
        let normalised = expression
            .replace('×', "*")
            .replace('÷', "/")
            .replace("**", "^");
        let parsed = mathverify::parser::parse_math(&normalised)
            .map_err(|_| format!("cannot parse the expression {expression:?}"))?;
        let value = mathverify::eval::exact(&parsed).ok_or_else(|| {
            format!(
                "{expression:?} has no exact rational value (symbols, an irrational result, a \
                 division by zero, or a number too large)"
            )
        })?;
        Ok(if value.is_integer() {
            value.to_integer().to_string()
        } else {
            format!("{}/{}", value.numer(), value.denom())
        })
    }
}

impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }

    fn schema(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluate an arithmetic expression exactly (integers, fractions, + - * / ^ and parentheses).",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "expression": {"type": "string", "description": "The expression, e.g. (23+58)*4-17"}
                    },
                    "required": ["expression"]
                }
            }
        })
    }

    fn call(&self, arguments: &Map<String, Value>) -> Result<String, String> {
        match arguments.get("expression") {
            Some(Value::String(e)) => Self::evaluate(e),
            Some(Value::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(format!("\"expression\" must be a string, got {other}")),
            None => Err("missing argument \"expression\"".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_arithmetic() {
        for (e, want) in [
            ("(23+58)*4-17", "307"),
            ("1/3 + 1/6", "1/2"),
            ("2^10", "1024"),
            ("2**3 × 3", "24"),
            ("0.1 + 0.2", "3/10"),
            ("12345678901234567890 * 10", "123456789012345678900"),
            ("-7 + 2", "-5"),
        ] {
            assert_eq!(Calculator::evaluate(e).as_deref(), Ok(want), "{e}");
        }
    }

    #[test]
    fn refuses_what_is_not_exact_arithmetic() {
        for e in ["", "x + 1", "1/0", "(2+", &"1+".repeat(400)] {
            assert!(Calculator::evaluate(e).is_err(), "{e:?}");
        }
        let args = |v: Value| v.as_object().cloned().unwrap();
        assert!(Calculator.call(&args(json!({}))).is_err());
        assert!(Calculator.call(&args(json!({"expression": [1]}))).is_err());
        assert_eq!(
            Calculator
                .call(&args(json!({"expression": "6*7"})))
                .unwrap(),
            "42"
        );
    }
}
