//! Hand-written cases for the general rules, through the public `is_correct` entry point
//! (gold: a bare reference answer; completion: free model text).

use mathverify::is_correct;

fn yes(gold: &str, completion: &str) {
    assert!(
        is_correct(gold, completion),
        "expected {gold:?} == answer of {completion:?}"
    );
}

fn no(gold: &str, completion: &str) {
    assert!(
        !is_correct(gold, completion),
        "expected {gold:?} != answer of {completion:?}"
    );
}

#[test]
fn extraction_forms() {
    yes("5", "The answer is \\boxed{5}.");
    yes("5", "We get 3 apples, so the final answer is 5.");
    yes("5", "Answer: 5");
    yes("5", "<answer>5</answer>");
    yes("5", "thus $x = 5$");
    yes("12", "first \\boxed{7} then corrected: \\boxed{12}");
    yes("\\frac{1}{2}", "so it is \\(\\frac12\\)");
    yes("1234", "It costs $1,234.");
    yes("0.5", "about 50%... no wait, exactly 0.5");
    no("5", "no numbers here");
    no("2", "AZYUK2A");
    yes("\\{1,2\\}", "\\boxed{1}, \\boxed{2}");
    yes("3", "\\fbox{3}");
    yes("18", "She makes 9 * 2 = $18 every day.\n#### 18");
}

#[test]
fn numbers_and_arithmetic() {
    yes("\\frac{14}{3}", "\\boxed{\\dfrac{14}{3}}");
    yes("\\frac{14}{3}", "\\boxed{4\\frac{2}{3}}");
    yes("2\\sqrt{2}", "\\boxed{\\sqrt{8}}");
    yes("2^{10}", "\\boxed{1024}");
    yes("\\binom{5}{2}", "\\boxed{10}");
    yes("120", "\\boxed{5!}");
    yes(
        "\\frac{\\sqrt{3}}{2}",
        "\\boxed{\\sin 60^\\circ}"
            .replace("60^\\circ", "\\frac{\\pi}{3}")
            .as_str(),
    );
    yes("1000000", "\\boxed{10^6}");
    yes("-\\frac{1}{3}", "\\boxed{-0.333333333}");
    no("\\frac{1}{3}", "\\boxed{0.33}");
    no("4", "\\boxed{4\\sqrt{2}}");
    yes("\\pi", "\\boxed{\\pi}");
    no("\\pi", "\\boxed{3.14}");
    yes("e^2", "\\boxed{\\exp(2)}");
    yes("3+4i", "\\boxed{4i+3}");
    yes("\\log_2 8", "\\boxed{3}");
    yes("|{-3}|", "\\boxed{3}");
    yes("\\lfloor 3.7 \\rfloor", "\\boxed{3}");
    yes("90^\\circ", "the angle is \\boxed{90}");
    yes("10\\%", "\\boxed{10}");
    yes("10\\%", "\\boxed{0.1}");
    yes("204_5", "\\boxed{204_5}");
    yes("2^{1009}", "\\boxed{2^{1009}}");
    no("2^{1009}", "\\boxed{2^{1008}}");
}

#[test]
fn algebra() {
    yes("x^2+2x+1", "\\boxed{(x+1)^2}");
    no("x^2+2x+1", "\\boxed{(x-1)^2}");
    yes("\\frac{x+2}{7}", "\\boxed{\\frac{x}{7}+\\frac{2}{7}}");
    yes("\\tan^2 y + 1", "\\boxed{\\sec^2 y}");
    yes("p - q", "\\boxed{-q+p}");
    no("p - q", "\\boxed{q-p}");
    yes("2 \\sin b \\cos a", "\\boxed{2\\cos a\\sin b}");
}

#[test]
fn structures() {
    yes(
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "\\boxed{(3, \\pi/2)}",
    );
    no("(3, 1)", "\\boxed{(1, 3)}");
    yes("[-2, 7]", "\\boxed{[-2,7]}");
    no("[-2, 7]", "\\boxed{(-2,7)}");
    yes(
        "(-\\infty, 3) \\cup (5, \\infty)",
        "\\boxed{(5,\\infty)\\cup(-\\infty,3)}",
    );
    yes("\\{1, 2, 3\\}", "\\boxed{\\{3, 2, 1\\}}");
    yes("1 \\pm \\sqrt{2}", "\\boxed{1+\\sqrt2, 1-\\sqrt2}");
    yes(
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
    );
    no(
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}",
    );
    yes("\\text{(C)}", "The answer is \\boxed{C}");
    yes("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}");
    no("\\text{Evelyn}", "\\boxed{\\text{Bob}}");
}

#[test]
fn relations() {
    yes("x = 3", "\\boxed{3}");
    yes("3", "\\boxed{x = 3}");
    yes("x \\le 5", "\\boxed{5 \\ge x}");
    no("x < 5", "\\boxed{x > 5}");
    yes("y = 2x + 1", "\\boxed{2x - y + 1 = 0}");
    yes("11", "\\boxed{x = 5+5+1 = 11}");
    no("2x + z = 1", "\\boxed{1}");
}

#[test]
fn hostile_inputs_are_bounded() {
    no("1", "\\boxed{10^{10^{10^{10}}}}");
    no("1", "\\boxed{100000000!}");
    no("1", &"(".repeat(5000));
    no("1", &"\\frac{".repeat(3000));
    no("1", &"$".repeat(10000));
    no("1", &"\\boxed{".repeat(2000));
    no("", "anything");
    // found by cargo-fuzz (an underflow in the parser's depth bookkeeping)
    no(
        "2^{10|frac{\u{3c4}{2=Sooooooooooooooooooooooooooooooooo ^{10}} r>",
        "1",
    );
}

#[test]
fn plain_text_math() {
    yes("2\\pi", "The answer is $2pi$.");
    yes("\\sqrt{2}", "answer: $sqrt(2)$");
    yes("\\frac{1}{2}", "The answer is 1/2.");
    yes("1000.99", "It costs 1,000.99€ in total");
}

#[test]
fn relations_against_sets() {
    yes("-2 \\le x \\le 7", "\\boxed{[-2, 7]}");
    yes("x > 3", "\\boxed{(3, \\infty)}");
    yes("1 \\le |z| \\le 2", "\\boxed{[-2,-1] \\cup [1,2]}");
    no("1 \\le |z| \\le 2", "\\boxed{[1,2]}");
    yes("x^2 < 4", "\\boxed{(-2, 2)}");
    no("x^2 \\le 4", "\\boxed{(-2, 2)}");
    yes("p=5,q=2;p=7,q=2", "\\boxed{(5,2),(7,2)}");
}

#[test]
fn deep_nesting_in_a_small_thread_stack() {
    let ok = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(|| {
            let deep = format!("\\boxed{{{}x{}}}", "(".repeat(60), ")".repeat(60));
            let too_deep = format!("\\boxed{{{}x{}}}", "(".repeat(5000), ")".repeat(5000));
            let braces = format!("\\boxed{{{}1{}}}", "{".repeat(3000), "}".repeat(3000));
            let powers = format!("\\boxed{{{}2}}", "2^".repeat(3000));
            is_correct("x", &deep)
                && !is_correct("x", &too_deep)
                && !is_correct("2", &braces)
                && !is_correct("1", &powers)
        })
        .map(|h| h.join().unwrap_or(false))
        .unwrap_or(false);
    assert!(ok);
}

#[test]
fn same_results_from_many_threads() {
    let pairs: Vec<(&str, String)> = vec![
        ("\\frac{14}{3}", "\\boxed{4\\frac{2}{3}}".to_string()),
        ("x^2+2x+1", "\\boxed{(x+1)^2}".to_string()),
        ("\\tan^2 y + 1", "\\boxed{\\sec^2 y}".to_string()),
        ("3", "The answer is 4.".to_string()),
        ("[-2, 7]", "so $x \\in [-2,7]$".to_string()),
        (
            "\\lfloor \\log_2 n \\rfloor + 1",
            "\\boxed{\\lfloor \\log_3 n \\rfloor + 1}".to_string(),
        ),
    ];
    let expected: Vec<bool> = pairs.iter().map(|(g, p)| is_correct(g, p)).collect();
    assert_eq!(expected, vec![true, true, true, false, true, false]);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    (0..50).all(|_| {
                        pairs
                            .iter()
                            .map(|(g, p)| is_correct(g, p))
                            .collect::<Vec<_>>()
                            == expected
                    })
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap_or(false), "a thread saw different results");
        }
    });
}
