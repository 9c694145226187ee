//! `banger image`: import, list, inspect, remove and prune images.

use super::*;

pub(super) fn run(
    client: &mut Client,
    command: ImageCommand,
    now: Timestamp,
) -> Result<(), Failure> {
    match command {
        ImageCommand::Import { path, name, json } => {
            let params = json!({"path": absolute(&path)?, "name": name});
            let mut stderr = std::io::stderr();
            let mut shown = String::new();
            let image = client.call_with_progress::<ImageResult>("image.import", params, |p| {
                // One line per phase and tenth, not per notification.
                let line = output::progress(&p.phase, p.current, p.total);
                let tenth = match (p.current, p.total) {
                    (Some(c), Some(t)) if t > 0 => c * 10 / t,
                    _ => 0,
                };
                let key = format!("{} {tenth}", p.phase);
                if key != shown {
                    let _ = writeln!(stderr, "{line}");
                    shown = key;
                }
            })?;
            let image = image.result.image;
            if json {
                println!("{}", output::json(&image));
            } else {
                println!(
                    "{} {} ({} layers, {})",
                    image.name,
                    output::short_digest(&image.digest),
                    image.layers.len(),
                    output::mib(image.disk_bytes)
                );
            }
        }
        ImageCommand::Ls { json } => {
            let images = client.call::<ImagesResult>("image.list", json!({}))?;
            show(json, &images.result.images, |v| {
                output::images_table(v, now)
            });
        }
        ImageCommand::Inspect { name, json } => {
            let image = client
                .call::<ImageResult>("image.inspect", json!({"name": name}))?
                .result
                .image;
            show(json, &image, |v| output::image_details(v, now));
        }
        ImageCommand::Rm { name, force, json } => {
            let removed = client
                .call::<ImagesRemoved>("image.remove", json!({"name": name, "force": force}))?
                .result;
            show(json, &removed, output::images_removed);
        }
        ImageCommand::Prune { json } => {
            let pruned = client
                .call::<ImagesRemoved>("image.prune", json!({}))?
                .result;
            show(json, &pruned, output::images_removed);
        }
    }
    Ok(())
}
