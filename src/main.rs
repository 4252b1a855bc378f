use clap::Parser;

mod app;

fn main() {
    let cli = app::cli::Cli::parse();
    if let Err(e) = kto::engine::cpu::isa::from_env() {
        eprintln!("kto: error: {e}");
        std::process::exit(1);
    }
    if let Err(e) = app::cli::run(cli) {
        if e.downcast_ref::<kto::Error>().is_some_and(|e| e.is_interruption()) {
            eprintln!("kto: {e}");
            std::process::exit(130);
        }
        eprintln!("kto: error: {e:#}");
        std::process::exit(1);
    }
}
