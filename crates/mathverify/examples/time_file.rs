//! Time extraction and gold parsing of one file's contents (development aid for slow inputs).
fn main() {
    let path = std::env::args().nth(1).unwrap_or_default();
    let bytes = std::fs::read(&path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let opts = mathverify::Options::default();
    let t0 = std::time::Instant::now();
    let a = mathverify::extract_answers(&text, &opts);
    println!(
        "extract: {:?} in {:.3} ms",
        a.iter().map(|x| x.display()).collect::<Vec<_>>(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let t0 = std::time::Instant::now();
    let g = mathverify::parse_gold(&text, &opts);
    println!(
        "parse_gold: {:?} in {:.3} ms",
        g.iter().map(|x| x.display()).collect::<Vec<_>>(),
        t0.elapsed().as_secs_f64() * 1e3
    );
}
