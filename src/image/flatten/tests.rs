use super::*;

fn meta(mode: u16) -> Meta {
    Meta {
        mode,
        ..Meta::default()
    }
}

fn file(path: &str, offset: u64) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::File {
            size: 1,
            data: DataRef { layer: 0, offset },
        },
        meta: meta(0o644),
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Dir,
        meta: meta(0o755),
    }
}

fn symlink(path: &str, target: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Symlink(target.into()),
        meta: meta(0o777),
    }
}

fn link(path: &str, target: &str) -> Entry {
    Entry {
        path: path.into(),
        kind: EntryKind::Hardlink(target.into()),
        meta: meta(0o644),
    }
}

fn layer(entries: Vec<Entry>) -> Layer {
    Layer {
        name: "sha256:test".into(),
        entries,
    }
}

const LOOSE: Bounds = Bounds {
    max_nodes: u64::MAX,
    max_memory: u64::MAX,
    entries_memory: 0,
};

/// Layers given bottom-up, as tests read best.
fn bottom_up(layers: Vec<Vec<Entry>>) -> Result<Tree, FlattenError> {
    bounded(layers, LOOSE)
}

fn bounded(layers: Vec<Vec<Entry>>, bounds: Bounds) -> Result<Tree, FlattenError> {
    let mut layers: Vec<Layer> = layers.into_iter().map(layer).collect();
    layers.reverse();
    flatten(&layers, bounds)
}

/// `a/a/.../a`, `depth` components.
fn chain(depth: usize) -> String {
    vec!["a"; depth].join("/")
}

#[test]
fn an_opaque_directory_over_a_chain_deeper_than_any_stack_is_pruned() {
    // A symlink into a deep chain, a file through it, then the chain's
    // top made opaque: the prune walks 200,000 levels.
    let depth = 200_000;
    let tree = bottom_up(vec![
        vec![symlink("s", &chain(depth)), file("s/f", 1)],
        vec![file("a/.wh..wh..opq", 0), file("a/kept", 2)],
    ])
    .expect("flatten");
    assert_eq!(offset(&tree, "a/kept"), Some(2));
    assert_eq!(tree.lookup("a/a"), None, "the lower chain is gone");
    assert!(tree.census().inodes < 10, "{:?}", tree.census());
}

#[test]
fn implied_directories_count_against_the_node_bound() {
    // 1,000 entries under unique 1,000-deep paths: a million implied
    // directories from a few thousand bytes of names.
    let entries: Vec<Entry> = (0..1_000)
        .map(|i| file(&format!("d{i}/{}/f", chain(999)), i))
        .collect();
    let bounds = Bounds {
        max_nodes: 100_000,
        ..LOOSE
    };
    let refused = refusal(bounded(vec![entries.clone()], bounds));
    assert_eq!(refused, Refusal::TooManyNodes(100_000));
    assert!(refused.to_string().contains("image.max_nodes"));
    let bounds = Bounds {
        max_memory: 64 << 20,
        ..LOOSE
    };
    let refused = refusal(bounded(vec![entries], bounds));
    assert_eq!(refused, Refusal::TooMuchMemory(64 << 20));
    assert!(refused.to_string().contains("image.max_memory_mib"));
}

#[test]
fn paths_through_symlinks_count_against_the_node_bound() {
    // Each entry walks a 2,000-component link 40 times: no node is
    // made, and still the walk is bounded.
    let mut entries = vec![dir("d"), symlink("l", &vec![".."; 2_000].join("/"))];
    entries.extend((0..20).map(|i| file(&format!("{}/d/f{i}", vec!["l"; 40].join("/")), i)));
    let bounds = Bounds {
        max_nodes: 1_000_000,
        ..LOOSE
    };
    assert_eq!(
        refusal(bounded(vec![entries.clone()], bounds)),
        Refusal::TooManyNodes(1_000_000)
    );
    let tree = bottom_up(vec![entries]).expect("unbounded");
    assert_eq!(offset(&tree, "d/f19"), Some(19));
}

#[test]
fn opaque_markers_repeated_over_a_large_directory_count_their_walks() {
    let mut entries: Vec<Entry> = (0..10_000).map(|i| file(&format!("d/f{i}"), i)).collect();
    entries.extend((0..10_000).map(|_| file("d/.wh..wh..opq", 0)));
    let bounds = Bounds {
        max_nodes: 1_000_000,
        ..LOOSE
    };
    assert_eq!(
        refusal(bounded(vec![entries], bounds)),
        Refusal::TooManyNodes(1_000_000)
    );
}

#[test]
fn the_entries_memory_counts_and_the_tree_reports_its_own() {
    let entries = vec![dir("etc"), file("etc/passwd", 1)];
    let tree = bottom_up(vec![entries.clone()]).expect("flatten");
    assert!(tree.memory >= 3 * NODE_BYTES, "{}", tree.memory);
    let bounds = Bounds {
        max_memory: 1 << 20,
        entries_memory: 1 << 20,
        ..LOOSE
    };
    assert_eq!(
        refusal(bounded(vec![entries], bounds)),
        Refusal::TooMuchMemory(1 << 20)
    );
}

fn offset(tree: &Tree, path: &str) -> Option<u64> {
    match tree.nodes[tree.lookup(path)?].kind {
        NodeKind::File { data, .. } => Some(data.offset),
        _ => None,
    }
}

fn refusal(result: Result<Tree, FlattenError>) -> Refusal {
    result.expect_err("refused").reason
}

#[test]
fn whiteouts_hide_lower_layers_and_later_entries_win() {
    let tree = bottom_up(vec![
        vec![dir("etc"), file("etc/motd", 1), file("etc/passwd", 2)],
        vec![
            file("etc/.wh.motd", 0),
            file("etc/passwd", 3),
            file("etc/passwd", 4),
        ],
    ])
    .expect("flatten");
    assert_eq!(tree.lookup("etc/motd"), None);
    assert_eq!(offset(&tree, "etc/passwd"), Some(4));
    assert!(tree.lookup("etc/.wh.motd").is_none());
}

#[test]
fn an_opaque_directory_hides_lower_content_but_keeps_its_own() {
    let tree = bottom_up(vec![
        vec![
            dir("d"),
            file("d/old", 1),
            dir("d/sub"),
            file("d/sub/deep", 2),
        ],
        vec![
            file("d/new", 3),
            file("d/.wh..wh..opq", 0),
            file("d/sub/fresh", 4),
        ],
    ])
    .expect("flatten");
    assert_eq!(tree.lookup("d/old"), None);
    assert_eq!(tree.lookup("d/sub/deep"), None);
    assert_eq!(offset(&tree, "d/new"), Some(3));
    assert_eq!(offset(&tree, "d/sub/fresh"), Some(4));
}

#[test]
fn a_file_replaced_by_a_directory_and_back() {
    let tree = bottom_up(vec![
        vec![file("x", 1)],
        vec![dir("x"), file("x/inner", 2)],
        vec![file("x", 3)],
    ])
    .expect("flatten");
    assert_eq!(offset(&tree, "x"), Some(3));
    let tree =
        bottom_up(vec![vec![file("x", 1)], vec![dir("x"), file("x/inner", 2)]]).expect("flatten");
    assert_eq!(offset(&tree, "x/inner"), Some(2));
}

#[test]
fn a_whiteout_and_an_entry_for_one_path_in_one_layer_are_refused() {
    let refused = refusal(bottom_up(vec![vec![file("a", 1), file(".wh.a", 0)]]));
    assert_eq!(refused, Refusal::WhiteoutAndEntry);
}

#[test]
fn hardlinks_share_an_inode_and_need_their_target() {
    let tree = bottom_up(vec![vec![file("a", 1)], vec![link("b", "/a")]]).expect("flatten");
    assert_eq!(tree.lookup("a"), tree.lookup("b"));
    assert_eq!(tree.census().inodes, 2); // the root and the file
    assert_eq!(
        refusal(bottom_up(vec![vec![link("b", "nowhere")]])),
        Refusal::HardlinkTargetMissing("nowhere".into())
    );
    assert_eq!(
        refusal(bottom_up(vec![vec![dir("d"), link("b", "d")]])),
        Refusal::HardlinkToDirectory("d".into())
    );
}

#[test]
fn names_that_climb_above_the_root_are_refused_and_absolute_names_stay_inside() {
    assert_eq!(
        refusal(bottom_up(vec![vec![file("../escape", 1)]])),
        Refusal::AboveRoot
    );
    assert_eq!(
        refusal(bottom_up(vec![vec![file("a/../../escape", 1)]])),
        Refusal::AboveRoot
    );
    let tree = bottom_up(vec![vec![file("/etc/passwd", 1), file("a/../b", 2)]]).expect("ok");
    assert_eq!(offset(&tree, "etc/passwd"), Some(1));
    assert_eq!(offset(&tree, "b"), Some(2));
}

#[test]
fn whiteouts_of_the_root_are_refused() {
    for name in [".wh..", ".wh...", "etc/.wh..", "etc/.wh..."] {
        assert_eq!(
            refusal(bottom_up(vec![vec![dir("etc")], vec![file(name, 0)]])),
            Refusal::WhiteoutOfRoot,
            "{name}"
        );
    }
    assert_eq!(
        refusal(bottom_up(vec![vec![file("/", 1)]])),
        Refusal::ReplacesRoot
    );
}

// containerd's breakout cases (archive/tar_test.go), each contained.

#[test]
fn symlink_absolute_and_up_and_out_resolve_inside_the_image() {
    // SymlinkAbsolute: `localetc -> /etc`, then `localetc/emptied`.
    let tree = bottom_up(vec![vec![
        dir("etc"),
        symlink("localetc", "/etc"),
        file("localetc/emptied", 1),
    ]])
    .expect("flatten");
    assert_eq!(offset(&tree, "etc/emptied"), Some(1));
    // SymlinkUpAndOut: `localetc -> ../../../../../etc`.
    let tree = bottom_up(vec![vec![
        dir("etc"),
        symlink("localetc", "../../../../../etc"),
        file("localetc/emptied", 1),
    ]])
    .expect("flatten");
    assert_eq!(offset(&tree, "etc/emptied"), Some(1));
}

#[test]
fn symlink_parent_directory_and_a_dead_symlink_make_the_target_inside() {
    // SymlinkParentDirectory: `etc/localetc -> ../etc`.
    let tree = bottom_up(vec![vec![
        dir("etc"),
        symlink("etc/localetc", "../etc"),
        file("etc/localetc/x", 1),
    ]])
    .expect("flatten");
    assert_eq!(offset(&tree, "etc/x"), Some(1));
    let tree = bottom_up(vec![vec![symlink("l", "/dne/deeper"), file("l/x", 2)]]).expect("flatten");
    assert_eq!(offset(&tree, "dne/deeper/x"), Some(2));
}

#[test]
fn hardlinks_relative_absolute_and_through_symlinks_stay_inside() {
    // HardlinkRelative / HardlinkAbsolute: targets name the image's root.
    let tree = bottom_up(vec![vec![
        dir("etc"),
        file("/etc/passwd", 1),
        link("localpasswd", "../../../../../etc/passwd"),
    ]]);
    assert_eq!(
        refusal(tree),
        Refusal::AboveRoot,
        "a relative target that climbs is refused"
    );
    let tree = bottom_up(vec![vec![
        dir("etc"),
        file("/etc/passwd", 1),
        link("localpasswd", "/etc/passwd"),
    ]])
    .expect("flatten");
    assert_eq!(tree.lookup("localpasswd"), tree.lookup("etc/passwd"));
    // HardlinkSymlinkChmod: a link to a symlink pointing outside links
    // the symlink itself; nothing outside is named or changed.
    let tree = bottom_up(vec![vec![
        symlink("/tmp/also-exists-outside-root", "/tmp/perm400"),
        link("/tmp/perm400-link", "/tmp/also-exists-outside-root"),
    ]])
    .expect("flatten");
    let linked = tree.lookup("tmp/perm400-link").expect("link");
    assert_eq!(
        tree.nodes[linked].kind,
        NodeKind::Symlink("/tmp/perm400".into())
    );
}

#[test]
fn a_directory_over_a_symlink_replaces_the_symlink() {
    // DirectoryOverrideSymlink: an explicit directory entry replaces
    // the symlink; its children stay under it, not under the target.
    let tree = bottom_up(vec![vec![
        dir("etc"),
        symlink("localetc", "/etc"),
        dir("localetc"),
        file("localetc/x", 1),
    ]])
    .expect("flatten");
    assert_eq!(offset(&tree, "localetc/x"), Some(1));
    assert_eq!(tree.lookup("etc/x"), None);
}

#[test]
fn whiteouts_through_symlinks_resolve_inside_the_image() {
    let lower = || {
        vec![
            dir("etc"),
            file("etc/passwd", 1),
            file("etc/whitedout", 2),
            symlink("localetc", "/etc"),
            symlink("deadetc", "/dne"),
        ]
    };
    // WhiteoutSymlinkPath
    let tree = bottom_up(vec![lower(), vec![file("localetc/.wh.whitedout", 0)]]).expect("flatten");
    assert_eq!(tree.lookup("etc/whitedout"), None);
    assert_eq!(offset(&tree, "etc/passwd"), Some(1));
    // WhiteoutDeadSymlinkParent: nothing to hide.
    let tree = bottom_up(vec![lower(), vec![file("deadetc/.wh.etc", 0)]]).expect("flatten");
    assert_eq!(offset(&tree, "etc/passwd"), Some(1));
    // WhiteoutRelativePath: `dne/../.wh.etc` is `.wh.etc`.
    let tree = bottom_up(vec![lower(), vec![file("dne/../.wh.etc", 0)]]).expect("flatten");
    assert_eq!(tree.lookup("etc"), None);
    // WhiteoutSymlink hides the symlink, not its target.
    let tree = bottom_up(vec![lower(), vec![file(".wh.localetc", 0)]]).expect("flatten");
    assert_eq!(tree.lookup("localetc"), None);
    assert_eq!(offset(&tree, "etc/passwd"), Some(1));
}

#[test]
fn umocis_symlink_named_dot_is_an_ordinary_name_inside() {
    // A symlink entry named `.` is the root entry: refused, never
    // followed; one named `a/.` is `a` itself.
    assert_eq!(
        refusal(bottom_up(vec![vec![symlink(".", "/etc")]])),
        Refusal::ReplacesRoot
    );
    let tree = bottom_up(vec![
        vec![dir("a"), symlink("a/.", "/")],
        vec![file("a/x", 1)],
    ])
    .expect("flatten");
    assert_eq!(offset(&tree, "x"), Some(1), "a is a symlink to / now");
}

#[test]
fn symlink_loops_and_files_as_parents_are_refused() {
    assert_eq!(
        refusal(bottom_up(vec![vec![
            symlink("a", "b"),
            symlink("b", "a"),
            file("a/x", 1)
        ]])),
        Refusal::SymlinkLoop
    );
    assert_eq!(
        refusal(bottom_up(vec![vec![file("f", 1), file("f/x", 2)]])),
        Refusal::ParentNotDirectory("/f".into())
    );
}

#[test]
fn the_census_counts_each_inode_once() {
    let tree = bottom_up(vec![vec![
        dir("d"),
        file("d/a", 1),
        link("d/b", "d/a"),
        symlink("s", &"x".repeat(80)),
    ]])
    .expect("flatten");
    let census = tree.census();
    assert_eq!(census.inodes, 4);
    assert_eq!(census.files, 1);
    assert_eq!(census.dir_entries, 4);
    assert_eq!(census.extra_blocks, 1);
}
