//! The committed header must equal a fresh cbindgen generation.
//! Regenerate with `CUDALLOC_BLESS=1 cargo test --test header`.

use std::path::PathBuf;

#[test]
fn committed_header_matches_fresh_generation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_crate(&root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).unwrap();
    let path = root.join("include/cudalloc.h");
    if std::env::var_os("CUDALLOC_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/cudalloc.h is stale: run `CUDALLOC_BLESS=1 cargo test --test header` and commit it"
    );
    for name in [
        "cudalloc_malloc",
        "cudalloc_free",
        "cudalloc_record_stream",
        "cudalloc_empty_cache",
        "cudalloc_get_stats",
        "cudalloc_reset_peak_stats",
        "cudalloc_last_error",
        "cudalloc_last_error_message",
        "CUDALLOC_ERR_CONFIG = 42005",
        "uint64_t num_invalid_frees;",
    ] {
        assert!(fresh.contains(name), "header lacks {name}");
    }
}
