// The web page of `instructblip serve`: pick, drop or paste an image, ask, and read the answer as it streams in
// (POST /v1/chat/completions with stream: true, the image as a data: URL). No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_SIDE = 1024; // larger images are scaled down before upload (the model sees 224 x 224)
let imageUrl = null; // data: URL of the chosen image
let modelId = null;

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = state || "";
  status.classList.toggle("error", state === "error");
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read the file"));
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("this file is not an image the browser can show"));
    img.src = url;
  });
}

async function useFile(file) {
  if (!file) return;
  setStatus("reading the image…", "busy");
  try {
    let url = await readAsDataUrl(file);
    const img = await loadImage(url);
    const scale = MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight);
    if (scale < 1) {
      const canvas = document.createElement("canvas");
      canvas.width = Math.round(img.naturalWidth * scale);
      canvas.height = Math.round(img.naturalHeight * scale);
      canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
      url = canvas.toDataURL("image/jpeg", 0.92);
    }
    imageUrl = url;
    $("preview").src = url;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    setStatus("", "ready");
  } catch (err) {
    imageUrl = null;
    setStatus(err.message, "error");
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function model() {
  if (modelId) return modelId;
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorMessage(response));
  modelId = (await response.json()).data[0].id;
  return modelId;
}

// Server-sent events: "data: {json}" blocks separated by blank lines, ending with "data: [DONE]".
async function readStream(response, onDelta) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
        }
      }
    }
  }
}

async function ask(event) {
  event.preventDefault();
  if (!imageUrl) {
    setStatus("choose or paste an image first", "error");
    return;
  }
  const button = $("ask");
  const answer = $("answer");
  button.disabled = true;
  answer.textContent = "";
  setStatus("waiting for the model…", "busy");
  try {
    const body = {
      model: await model(),
      stream: true,
      max_tokens: Number($("max-tokens").value) || 128,
      temperature: Number($("temperature").value) || 0,
      messages: [{
        role: "user",
        content: [
          { type: "text", text: $("instruction").value },
          { type: "image_url", image_url: { url: imageUrl } },
        ],
      }],
    };
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorMessage(response));
    setStatus("answering…", "busy");
    await readStream(response, (text) => { answer.textContent += text; });
    setStatus("done", "done");
  } catch (err) {
    setStatus(err.message, "error");
  } finally {
    button.disabled = false;
  }
}

function init() {
  const drop = $("drop");
  $("image-input").addEventListener("change", (e) => useFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) useFile(item.getAsFile());
  });
  $("ask-form").addEventListener("submit", ask);
  $("api-key").addEventListener("change", () => { modelId = null; });
}

init();
