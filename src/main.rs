use clap::Parser;

fn main() {
    let cli = kto::cli::Cli::parse();
    if let Err(e) = kto::cli::run(cli) {
        eprintln!("kto: error: {e:#}");
        std::process::exit(1);
    }
}
