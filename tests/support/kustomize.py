"""A kustomize renderer for the subset deploy/k8s uses, so that the manifests are rendered and checked without
kubectl or kustomize (tests/test_deploy_manifests.py, and `make lint`, which hands the rendered objects to
checkov).

Supported kustomization fields: `resources` (files, and folders holding a kustomization), `namespace`,
`images` (name, newName, newTag, digest) and `patches` given as strategic merge patches (`path:` or inline
`patch:`, no `target:`), including `$patch: delete` of a whole object. Anything else is an error, so a
kustomization that starts using more fails here instead of rendering differently from kustomize.

Strategic merge follows Kubernetes' patch strategy for the lists used here: containers, env, volumes,
volumeMounts and ports merge item by item on their merge key (the patch's items first, in its order, then the
other original items, as kustomize writes them); other lists are replaced; a null value deletes its key.

    python tests/support/kustomize.py deploy/k8s/overlays/gpu [OUT.yaml]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
# Lists of objects that strategic merge combines item by item, by merge key (Kubernetes' patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name"}
# Kinds without a namespace (those a kustomization here could hold).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass"}

Obj = dict[str, Any]


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render as kustomize would."""


def render(folder: str | Path) -> list[Obj]:
    """The objects the kustomization in `folder` produces."""
    folder = Path(folder)
    found = [folder / name for name in KUSTOMIZATION_FILES if (folder / name).is_file()]
    if not found:
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(found[0].read_text()) or {}
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{found[0]}: unsupported fields {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in spec.get("resources") or []:
        path = folder / entry
        objects.extend(render(path) if path.is_dir() else _load(path))
    for patch in spec.get("patches") or []:
        unknown = set(patch) - {"path", "patch"}
        if unknown or len(patch) != 1:
            raise KustomizeError(f"{found[0]}: a patch needs exactly one of path or patch (got {sorted(patch)})")
        docs = _load(folder / patch["path"]) if "path" in patch else _docs(patch["patch"], f"{found[0]} patch")
        for doc in docs:
            objects = _apply_patch(objects, doc)
    for image in spec.get("images") or []:
        for obj in objects:
            _set_image(obj, image)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = spec["namespace"]
            elif obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    _check_unique(objects, folder)
    return objects


def key_of(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name): what makes an object one of its kind."""
    meta = obj.get("metadata") or {}
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def dump(objects: list[Obj]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def _docs(text: str, where: str) -> list[Obj]:
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "name" not in (doc.get("metadata") or {}):
            raise KustomizeError(f"{where}: every document needs kind and metadata.name")
    return docs


def _load(path: Path) -> list[Obj]:
    if not path.is_file():
        raise KustomizeError(f"{path}: no such file")
    return _docs(path.read_text(), str(path))


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def _apply_patch(objects: list[Obj], patch: Obj) -> list[Obj]:
    """`objects` with the strategic merge patch applied to the one object it names (by group, kind and name,
    and namespace when the patch gives one)."""
    meta = patch["metadata"]
    matches = [i for i, obj in enumerate(objects)
               if obj["kind"] == patch["kind"] and obj["metadata"]["name"] == meta["name"]
               and _group(obj.get("apiVersion", "")) == _group(patch.get("apiVersion", ""))
               and ("namespace" not in meta or obj["metadata"].get("namespace") == meta["namespace"])]
    if len(matches) != 1:
        raise KustomizeError(f"patch for {patch['kind']} {meta['name']}: {len(matches)} objects match, need 1")
    index = matches[0]
    directive = patch.get("$patch")
    if directive == "delete":
        return objects[:index] + objects[index + 1:]
    if directive is not None:
        raise KustomizeError(f"patch for {patch['kind']} {meta['name']}: unsupported $patch: {directive}")
    merged = _merge(objects[index], patch, patch["kind"])
    return objects[:index] + [merged] + objects[index + 1:]


def _merge(original: Any, patch: Any, where: str, field: str = "") -> Any:
    if isinstance(patch, dict):
        if not isinstance(original, dict):
            return copy.deepcopy(patch)
        out = copy.deepcopy(original)
        for key, value in patch.items():
            if key.startswith("$"):
                raise KustomizeError(f"{where}: unsupported directive {key}")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, f"{where}.{key}", key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(patch, list) and isinstance(original, list):
        merge_key = MERGE_KEYS.get(field)
        if field == "ports" and patch and all(isinstance(item, dict) for item in patch):
            merge_key = "containerPort" if "containerPort" in patch[0] else "port"
        if merge_key is not None:
            return _merge_list(original, patch, merge_key, where)
    return copy.deepcopy(patch)


def _merge_list(original: list[Obj], patch: list[Obj], merge_key: str, where: str) -> list[Obj]:
    rest = list(original)
    head: list[Obj] = []
    for item in patch:
        if merge_key not in item:
            raise KustomizeError(f"{where}: a list item without its merge key {merge_key}")
        same = [i for i, old in enumerate(rest) if old.get(merge_key) == item[merge_key]]
        if item.get("$patch") == "delete":
            rest = [old for i, old in enumerate(rest) if i not in same]
            continue
        if same:
            head.append(_merge(rest.pop(same[0]), item, f"{where}[{item[merge_key]}]"))
        else:
            head.append(_merge(None, item, f"{where}[{item[merge_key]}]"))
    return head + rest


def _split_image(image: str) -> tuple[str, str]:
    """(name, "" or ":tag" or "@digest") of an image reference; a registry port is part of the name."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _set_image(node: Any, rule: Obj) -> None:
    """kustomize's images transformer on every container and init container under `node`."""
    unknown = set(rule) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"images: unsupported fields {sorted(unknown)}")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    name, suffix = _split_image(container.get("image", ""))
                    if name != rule["name"]:
                        continue
                    if "digest" in rule:
                        suffix = "@" + rule["digest"]
                    elif "newTag" in rule:
                        suffix = ":" + str(rule["newTag"])
                    container["image"] = rule.get("newName", name) + suffix
            else:
                _set_image(value, rule)
    elif isinstance(node, list):
        for item in node:
            _set_image(item, rule)


def _check_unique(objects: list[Obj], folder: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = key_of(obj)
        if key in seen:
            raise KustomizeError(f"{folder}: {key} appears twice")
        seen.add(key)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: kustomize.py KUSTOMIZATION_FOLDER [OUT.yaml]", file=sys.stderr)
        return 2
    text = dump(render(argv[0]))
    if len(argv) == 2:
        Path(argv[1]).parent.mkdir(parents=True, exist_ok=True)
        Path(argv[1]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
