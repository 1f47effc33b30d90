//! The toolbox: dispatch, errors as results, response cuts.

use super::*;

fn config() -> ToolsConfig {
    ToolsConfig {
        functions: vec![ToolSpec {
            name: "calculator".into(),
            options: None,
        }],
        max_turns: 2,
        max_total_tokens: None,
        timeout_secs: 1.0,
        max_output_bytes: 1000,
        max_response_chars: 40,
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/qwen2/tied_f32"
    )))
    .unwrap()
}

#[test]
fn runs_calls_and_turns_failures_into_error_results() {
    let tb = Toolbox::new(&config(), &tokenizer()).unwrap();
    let call = |body: &str| format!("<tool_call>\n{body}\n</tool_call>");
    let ok = tb.run(&call(
        r#"{"name": "calculator", "arguments": {"expression": "(23+58)*4-17"}}"#,
    ));
    assert_eq!((ok.response.as_str(), ok.error), ("307", false));
    assert_eq!(ok.name.as_deref(), Some("calculator"));
    for (body, want) in [
        (
            r#"{"name": "search", "arguments": {}}"#,
            "error: unknown tool \"search\"",
        ),
        (r#"{"name": "calculator""#, "error: malformed tool call"),
        (
            r#"{"name": "calculator", "arguments": {"expression": "x"}}"#,
            "error: \"x\" has no",
        ),
    ] {
        let r = tb.run(&call(body));
        assert!(
            r.error && r.response.starts_with(want),
            "{body}: {}",
            r.response
        );
        assert!(
            r.response.chars().count() <= 41,
            "cut to max_response_chars"
        );
    }
    let long = tb.run(&call(
        r#"{"name": "calculator", "arguments": {"expression": "10^60"}}"#,
    ));
    assert_eq!(long.response, format!("1{}…", "0".repeat(39)));
    // Parallel runs keep the input order.
    let texts: Vec<String> = (1..=20)
        .map(|i| {
            call(&format!(
                r#"{{"name": "calculator", "arguments": {{"expression": "{i}*{i}"}}}}"#
            ))
        })
        .collect();
    let answers: Vec<String> = tb.run_all(&texts).into_iter().map(|r| r.response).collect();
    let want: Vec<String> = (1..=20).map(|i: i32| (i * i).to_string()).collect();
    assert_eq!(answers, want);
}

#[test]
fn config_errors_are_clear() {
    let tok = tokenizer();
    let mut c = config();
    c.functions.push(ToolSpec {
        name: "calculator".into(),
        options: None,
    });
    assert!(format!("{:#}", Toolbox::new(&c, &tok).unwrap_err()).contains("two tools"));
    let mut c = config();
    c.functions[0].name = "shell".into();
    assert!(format!("{:#}", Toolbox::new(&c, &tok).unwrap_err()).contains("unknown tool"));
    let mut c = config();
    c.functions[0].name = "external".into();
    assert!(format!("{:#}", Toolbox::new(&c, &tok).unwrap_err()).contains("needs options"));
    let mut c = config();
    c.max_turns = 0;
    assert!(Toolbox::new(&c, &tok).is_err());
    // The recipe form.
    let parsed: ToolsConfig = toml::from_str(
        "max_turns = 3\n[[functions]]\nname = \"python\"\noptions = { cpu_secs = 2 }\n",
    )
    .unwrap();
    assert_eq!(parsed.max_turns, 3);
    assert!(
        toml::from_str::<ToolsConfig>("[[functions]]\nname = \"calculator\"\ntypo = 1\n").is_err()
    );
}

#[test]
fn the_tiny_template_without_tool_support_falls_back_to_qwen_text() {
    let tb = Toolbox::new(&config(), &tokenizer()).unwrap();
    assert_eq!(tb.format().source, FormatSource::BuiltIn);
    assert_eq!(
        tb.format().render("7"),
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n7\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    );
}

/// The tool turn and the tool list against transformers' `apply_chat_template` with the
/// Qwen2.5-Instruct template (tests/fixtures/tools/make_tool_turn.py): the prompt's tokens
/// with the tools listed, and prompt + the model's call + the tool turn rendered here equal
/// the whole conversation's tokens.
#[test]
fn tool_turn_tokens_match_transformers() {
    let fixture: Value = serde_json::from_str(include_str!(
        "../../../../tests/fixtures/tools/tool_turn.json"
    ))
    .unwrap();
    let mut tok = tokenizer();
    tok.set_chat_template(Some(include_str!(
        "../tokenizer/testdata/qwen2.5-instruct.chat_template.jinja"
    )))
    .unwrap();
    let tb = Toolbox::new(&config(), &tok).unwrap();
    assert_eq!(tb.format().source, FormatSource::ChatTemplate);
    assert_eq!(tb.schemas(), fixture["tools"].as_array().unwrap().clone());
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt = crate::tokenizer::Prompt::Chat(vec![crate::tokenizer::ChatMessage::new(
        "user",
        "Compute (23+58)*4-17.",
    )]);
    let prompt_ids = encode_prompt_with_tools(&tok, &prompt, &tb.schemas()).unwrap();
    assert_eq!(prompt_ids, ids(&fixture["prompt"]["ids"]));
    let call = fixture["call_text"].as_str().unwrap();
    let turn = tb.format().render(fixture["response"].as_str().unwrap());
    let mut full = prompt_ids.clone();
    full.extend(tok.encode(call, false).unwrap());
    full.extend(tok.encode(&turn, false).unwrap());
    assert_eq!(full, ids(&fixture["full"]["ids"]));
    let text = tok.decode(&full, false).unwrap();
    assert_eq!(text, fixture["full"]["text"].as_str().unwrap());
}
