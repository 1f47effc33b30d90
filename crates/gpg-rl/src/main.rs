//! `gpg-rl`: the command line of gpg-rl.

fn main() {}
