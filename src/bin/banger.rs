//! banger: the command-line client of bangerd.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "banger",
    version,
    about = "Run and supervise microVMs made from OCI images"
)]
struct Args {}

fn main() {
    Args::parse();
}
