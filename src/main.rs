use clap::Parser;

fn main() {
    let cli = kto::cli::Cli::parse();
    if let Err(e) = kto::cli::run(cli) {
        if let Some(kto::Error::Interrupted { .. }) = e.downcast_ref::<kto::Error>() {
            eprintln!("kto: {e}");
            std::process::exit(130);
        }
        eprintln!("kto: error: {e:#}");
        std::process::exit(1);
    }
}
