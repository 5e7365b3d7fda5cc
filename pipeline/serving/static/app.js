// The page of `subjectforge serve`: plain DOM calls against the app's own JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
let photos = [];  // base64 (no data: prefix) of the reference photos, at most 6

async function loadSubjects() {
  const answer = await fetch("v1/subjects");
  if (!answer.ok) return;
  for (const model of (await answer.json()).subjects) {
    const refs = Object.keys(model.aliases).map((alias) => `models:/${model.name}@${alias}`);
    if (model.latest_version) refs.push(`models:/${model.name}/${model.latest_version}`);
    for (const ref of refs) $("subject").add(new Option(ref, ref));
  }
}

function readPhoto(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addPhotos(files) {
  for (const file of Array.from(files).slice(0, 6 - photos.length)) {
    const url = await readPhoto(file);
    photos.push(url.slice(url.indexOf(",") + 1));
    const img = document.createElement("img");
    img.src = url;
    $("previews").append(img);
  }
}

function request() {
  const size = Number($("size").value);
  const body = {
    prompt: $("prompt").value,
    num_images: Number($("num_images").value),
    steps: Number($("steps").value),
    seed: Number($("seed").value),
    height: size,
    width: size,
  };
  if ($("subject").value) body.subject = $("subject").value;
  else Object.assign(body, { reference_images: photos, category: $("category").value });
  return body;
}

async function generate(event) {
  event.preventDefault();
  const status = $("status");
  status.className = "";
  status.textContent = "generating...";
  $("generate").disabled = true;
  try {
    const answer = await fetch("v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request()),
    });
    const result = await answer.json();
    if (!answer.ok) throw new Error(`${result.field}: ${result.error}`);
    $("images").replaceChildren(...result.images.map((png) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${png}`;
      img.alt = `${result.subject} seed ${result.seed}`;
      return img;
    }));
    status.textContent = `${result.subject}${result.model_version ? ` version ${result.model_version}` : ""}, seed ${result.seed}`;
  } catch (error) {
    status.className = "error";
    status.textContent = error.message;
  } finally {
    $("generate").disabled = false;
  }
}

$("photos").addEventListener("change", (event) => addPhotos(event.target.files));
$("drop").addEventListener("dragover", (event) => { event.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  addPhotos(event.dataTransfer.files);
});
$("form").addEventListener("submit", generate);
loadSubjects();
