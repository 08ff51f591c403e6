fn main() {
    let cli = attractors::cli::parse();
    if let Err(e) = attractors::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(if attractors::ffi::interrupted() { 130 } else { 1 });
    }
}
