//! Print what the verifier extracts from a gold and a prediction (development aid).
//! Usage: cargo run --release -p mathverify --example debug_case -- GOLD PRED

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: debug_case GOLD PRED");
        std::process::exit(2);
    }
    let opts = mathverify::Options::default();
    let g = mathverify::extract_answers(&args[1], &opts);
    let p = mathverify::extract_answers(&args[2], &opts);
    for a in &g {
        println!("gold: {:?}", a);
    }
    for a in &p {
        println!("pred: {:?}", a);
    }
    println!("correct: {}", mathverify::verify(&g, &p, &opts));
}
