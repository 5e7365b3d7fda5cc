#!/bin/bash
# install.sh DIR TARGET [missing]: the wheels of DIR into TARGET; with "missing", only the
# distributions the image's python3 lacks (so the image's own numpy, protobuf... stay in use).
dir=$1 target=$2 mode=${3:-all}
mkdir -p "$target"
list=()
for f in "$dir"/*.whl; do
  name=$(basename "$f" | cut -d- -f1)
  if [ "$mode" = missing ] && env -u PYTHONPATH python3 -c "import importlib.metadata as m,sys; m.version(sys.argv[1])" "$name" 2>/dev/null; then
    continue
  fi
  list+=("$f")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${list[@]}" \
  && echo "installed ${#list[@]} wheels of $dir into $target"
